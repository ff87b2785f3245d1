//! The child side of the crash tests: a process that works on a store until it is killed,
//! reporting each operation before it starts ("@B ...") and after it returned ("@A ..."),
//! one atomic pipe write per record, so the parent knows what was acknowledged and what may
//! have been in flight when the signal landed.

use crate::shm::Ungated;
use super::tests::owner;
use super::{DictRef, Store, Update};
use std::path::PathBuf;

pub const ROLE: &str = "PYPORT_SHM_CHILD";
pub const PATH: &str = "PYPORT_SHM_PATH";
pub const LIFE: &str = "PYPORT_SHM_LIFE";
pub const DICTS: &str = "PYPORT_SHM_DICTS";
/// Which of the concurrent children this is: its set keys are `s{slot}-N`, written by one
/// life of that slot at a time, so each key's history is sequential.
pub const SLOT: &str = "PYPORT_SHM_SLOT";

/// Writes one record with a single write(2) on fd 1: below PIPE_BUF it is atomic, and it is
/// in the pipe before the next operation starts, so a kill cannot lose it.
pub fn record(line: &str) {
    let bytes = format!("\n@{line}\n").into_bytes();
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: writing our own buffer to fd 1.
        let n = unsafe { libc::write(1, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if n <= 0 {
            std::process::exit(3);
        }
        done += n as usize;
    }
}

/// The value the set with this seed and length stores: both sides can compute it.
pub fn value(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn open() -> Store {
    Store::open(&PathBuf::from(env(PATH))).expect("child opens the store")
}

/// Adds one to the little-endian u64 under `key`.
pub fn incr(d: &DictRef, key: &[u8]) -> u64 {
    d.update(key, &Ungated, |cur| {
        let n = cur.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes) + 1;
        Update { store: Some(n.to_le_bytes()), answer: n }
    })
    .expect("incr")
}

/// Adds one with a read, then a compare-and-swap on the version read (retried on a race).
fn cas_incr(d: &DictRef, key: &[u8]) -> u64 {
    loop {
        let seen = d.get(key).expect("get");
        let n = seen.as_ref().and_then(|(b, _)| b.as_slice().try_into().ok()).map_or(0, u64::from_le_bytes) + 1;
        if d.replace_if_version(key, seen.map(|s| s.1), &n.to_le_bytes(), &Ungated).expect("cas") {
            return n;
        }
    }
}

/// A fixed script that passes every crash point of the store, each step recorded.
pub fn script() {
    let store = open();
    record("B N");
    let d = store.create_dict(&owner(1)).expect("create");
    record(&format!("A N {} {}", d.id(), hex(d.token())));
    for round in 0..2u64 {
        for i in 0..40u64 {
            let len = (i * 37 + round * 11) as usize % 700;
            record(&format!("B S k{i} {} {len}", round * 100 + i));
            d.set(format!("k{i}").as_bytes(), &value(round * 100 + i, len), &Ungated).expect("set");
            record(&format!("A S k{i}"));
        }
        if round == 0 {
            let (_, v) = d.get(b"k0").expect("get").expect("k0");
            d.mark_cached_if_version(b"k0", v, || ());
            record("A M k0");
        }
    }
    for i in 0..20u64 {
        record(&format!("B D k{i}"));
        d.del(format!("k{i}").as_bytes(), &Ungated).expect("del");
        record(&format!("A D k{i}"));
    }
    record("B G 2");
    store.give_away(d.id(), d.token(), &owner(2), Some(&owner(1))).expect("give_away");
    record("A G 2");
    record("B K");
    d.clear(&Ungated).expect("clear");
    record("A K");
    for i in 0..3u64 {
        record(&format!("B S z{i} {} 5000", 900 + i));
        d.set(format!("z{i}").as_bytes(), &value(900 + i, 5000), &Ungated).expect("set");
        record(&format!("A S z{i}"));
    }
    record("B X");
    store.destroy(d.id(), d.token(), &Ungated).expect("destroy");
    record("A X");
}

/// Hammers the shared dicts (counters, compare-and-swap counters, sets and deletes) and a
/// dict of its own (create, give_away, clear, destroy) until killed.
pub fn hammer() {
    let store = open();
    let life: u64 = env(LIFE).parse().expect("life");
    let slot: u64 = env(SLOT).parse().expect("slot");
    let dicts: Vec<DictRef> = env(DICTS)
        .split(',')
        .map(|s| {
            let (id, token) = s.split_once(':').expect("id:token");
            store.lookup(id.parse().expect("id"), &unhex(token)).expect("shared dict")
        })
        .collect();
    let (counters, sets) = (&dicts[0], &dicts[1]);
    let mut rng = Rng(life.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let mut own: Option<DictRef> = None;
    for n in 0u64.. {
        let r = rng.next();
        match r % 100 {
            0..=34 => {
                let k = r / 100 % 8;
                record(&format!("B I {k}"));
                let v = incr(counters, format!("ctr{k}").as_bytes());
                record(&format!("A I {k} {v}"));
            }
            35..=44 => {
                let k = r / 100 % 4;
                record(&format!("B C {k}"));
                let v = cas_incr(counters, format!("cas{k}").as_bytes());
                record(&format!("A C {k} {v}"));
            }
            45..=79 => {
                let key = format!("s{slot}-{}", r / 100 % 40);
                let len = if r.is_multiple_of(53) { 70_000 } else { (r >> 20) as usize % 3000 };
                let seed = life << 32 | n;
                record(&format!("B S {key} {seed} {len}"));
                sets.set(key.as_bytes(), &value(seed, len), &Ungated).expect("set");
                record(&format!("A S {key}"));
            }
            80..=89 => {
                let key = format!("s{slot}-{}", r / 100 % 40);
                record(&format!("B D {key}"));
                sets.del(key.as_bytes(), &Ungated).expect("del");
                record(&format!("A D {key}"));
            }
            _ => own = own_dict_step(&store, own, life, r),
        }
    }
}

/// One step on the child's own dict: create it, fill it, give it away, clear or destroy it.
fn own_dict_step(store: &Store, own: Option<DictRef>, life: u64, r: u64) -> Option<DictRef> {
    let Some(d) = own else {
        record("B N");
        let d = store.create_dict(&owner(life as u32)).expect("create");
        record(&format!("A N {} {}", d.id(), hex(d.token())));
        return Some(d);
    };
    match r / 100 % 6 {
        0 => {
            record(&format!("B X {}", d.id()));
            store.destroy(d.id(), d.token(), &Ungated).expect("destroy");
            record(&format!("A X {}", d.id()));
            return None;
        }
        1 => {
            record(&format!("B G {}", d.id()));
            store.give_away(d.id(), d.token(), &owner(life as u32 + 1_000_000), None).expect("give_away");
            record(&format!("A G {}", d.id()));
        }
        2 => {
            d.clear(&Ungated).expect("clear");
        }
        _ => {
            for i in 0..20u64 {
                d.set(format!("o{i}").as_bytes(), &value(r + i, (r % 900) as usize), &Ungated).expect("own set");
            }
        }
    }
    Some(d)
}
