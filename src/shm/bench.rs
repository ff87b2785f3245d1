//! Measurements (ignored tests, run by hand; see DESIGN.md for the figures): the store's
//! set+get pair on small values, in one thread, in two threads, and in two processes. Cases are interleaved and repeated; the median is printed.
//!
//! `taskset -c 0 cargo test --release shm::bench::single -- --ignored --nocapture`
//! `cargo test --release shm::bench::parallel -- --ignored --nocapture`

use crate::shm::Ungated;
use super::crash_child::{self as child, hex, record, unhex};
use super::crash_tests::{reap, spawn};
use super::tests::{owner, temp_store};
use super::{DictRef, Store};
use std::hint::black_box;
use std::time::Instant;

const KEY: &[u8; 20] = b"a-key-of-20-bytes-xx";
const VALUE: &[u8; 30] = b"a pickled value of 30 bytes...";
const ROUNDS: usize = 7;
const PAIRS: u64 = 1_000_000;
pub const BENCH_DICT: &str = "PYPORT_SHM_BENCH_DICT";

/// ns per set+get pair on one key, `n` times.
fn store_pairs(d: &DictRef, n: u64) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        d.set(KEY, VALUE, &Ungated).unwrap();
        black_box(d.get(KEY).unwrap());
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// The same on 1000 keys in turn (tables and entries out of the first cache lines).
fn store_pairs_many(d: &DictRef, n: u64) -> f64 {
    let keys: Vec<Vec<u8>> = (0..1000).map(|i| format!("key-{i:016}").into_bytes()).collect();
    let start = Instant::now();
    for i in 0..n {
        let k = &keys[(i % 1000) as usize];
        d.set(k, VALUE, &Ungated).unwrap();
        black_box(d.get(k).unwrap());
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A named measurement: ns per operation.
type Case<'a> = (&'a str, Box<dyn FnMut() -> f64 + 'a>);

/// Runs the cases in turn, ROUNDS times, and prints each one's median.
fn interleaved(cases: &mut [Case<'_>]) {
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, f)) in cases.iter_mut().enumerate() {
            results[i].push(f());
        }
    }
    for ((name, _), r) in cases.iter().zip(results) {
        let min = r.iter().copied().fold(f64::MAX, f64::min);
        eprintln!("{name:<46} median {:>7.1} ns   min {min:>7.1} ns", median(r));
    }
}

#[test]
#[ignore = "a measurement, run by hand"]
fn single() {
    let t = temp_store(64 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    interleaved(&mut [
        ("store set+get pair, one key", Box::new(|| store_pairs(&d, PAIRS))),
        ("store set+get pair, 1000 keys", Box::new(|| store_pairs_many(&d, PAIRS))),
        ("store get only, one key", Box::new(|| {
            let start = Instant::now();
            for _ in 0..PAIRS {
                black_box(d.get(KEY).unwrap());
            }
            start.elapsed().as_nanos() as f64 / PAIRS as f64
        })),
    ]);
}

/// Two threads at once, on one dict (one lock) and on a dict each; ns per pair per thread.
#[test]
#[ignore = "a measurement, run by hand"]
fn parallel() {
    let t = temp_store(64 << 20);
    let shared = t.store.create_dict(&owner(1)).unwrap();
    let own: Vec<DictRef> = (0..2).map(|_| t.store.create_dict(&owner(1)).unwrap()).collect();
    let two_threads = |dicts: [&DictRef; 2]| {
        let times: Vec<f64> = std::thread::scope(|s| {
            let hs: Vec<_> = dicts.iter().map(|d| s.spawn(move || store_pairs(d, PAIRS))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        times.iter().sum::<f64>() / 2.0
    };
    let path = t.path.display().to_string();
    let two_processes = |dicts: [&DictRef; 2]| {
        let children: Vec<_> = dicts
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let envs = [(child::ROLE, "bench".to_string()), (child::PATH, path.clone()), (BENCH_DICT, format!("{}:{}", d.id(), hex(d.token())))];
                spawn(&envs, i as u64)
            })
            .collect();
        let ns: Vec<f64> = children.into_iter().map(|c| reap(c, false).0.iter().find_map(|r| r.strip_prefix("A bench ")?.parse().ok()).expect("a result")).collect();
        ns.iter().sum::<f64>() / 2.0
    };
    interleaved(&mut [
        ("1 thread, 1 dict", Box::new(|| store_pairs(&shared, PAIRS))),
        ("2 threads, same dict", Box::new(|| two_threads([&shared, &shared]))),
        ("2 threads, a dict each", Box::new(|| two_threads([&own[0], &own[1]]))),
        ("2 processes, same dict", Box::new(|| two_processes([&shared, &shared]))),
        ("2 processes, a dict each", Box::new(|| two_processes([&own[0], &own[1]]))),
    ]);
}

/// The child side of `parallel`: the loop on one dict, reporting ns per pair.
pub fn bench_child() {
    let store = Store::open(std::path::Path::new(&std::env::var(child::PATH).unwrap())).unwrap();
    let spec = std::env::var(BENCH_DICT).unwrap();
    let (id, token) = spec.split_once(':').unwrap();
    let d = store.lookup(id.parse().unwrap(), &unhex(token)).unwrap();
    record(&format!("A bench {}", store_pairs(&d, PAIRS)));
}
