//! Crash tests: child processes (this test binary, re-executed in a child role) work on a
//! store and are SIGKILLed, at each step of the crash protocol and at random moments; the
//! parent then checks that every acknowledged write is there, that what was in flight is
//! either wholly there or not at all, that the repaired locks work, and that `check()` finds
//! nothing wrong.

use crate::shm::Ungated;
use super::crash_child::{self as child, unhex, value};
use super::tests::{assert_clean, owner, temp_path, TempStore};
use super::{DictRef, Error, Store};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Not a test: the entry point of the child processes (does nothing without its env vars).
#[test]
#[ignore = "the child role of the crash tests, started by them"]
fn child() {
    if std::env::var(child::ROLE).is_ok() {
        // A parent test that fails mid-way must not leave children hammering the machine:
        // they die with the thread that started them.
        // SAFETY: plain prctl on ourselves.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        // ...including a parent that died before the line above.
        // SAFETY: plain getppid.
        if std::env::var("PYPORT_SHM_PARENT").ok() != Some(unsafe { libc::getppid() }.to_string()) {
            return;
        }
    }
    match std::env::var(child::ROLE).as_deref() {
        Ok("script") => child::script(),
        Ok("hammer") => child::hammer(),
        Ok("bench") => super::bench::bench_child(),
        _ => {}
    }
}

/// A running child and the reader of its records.
pub struct Child {
    pub life: u64,
    proc: std::process::Child,
    reader: JoinHandle<Vec<String>>,
    pub acked: Arc<AtomicU64>,
}

pub fn spawn(envs: &[(&str, String)], life: u64) -> Child {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "shm::crash_tests::child", "--ignored", "--nocapture", "--test-threads=1", "-q"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::null()).stdin(Stdio::null());
    cmd.env("PYPORT_SHM_PARENT", std::process::id().to_string());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut proc = cmd.spawn().expect("spawn child");
    let out = proc.stdout.take().expect("child stdout");
    let acked = Arc::new(AtomicU64::new(0));
    let seen = acked.clone();
    let reader = std::thread::spawn(move || {
        let mut records = Vec::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(r) = line.strip_prefix('@') {
                if r.starts_with("A ") {
                    seen.fetch_add(1, Relaxed);
                }
                records.push(r.to_string());
            }
        }
        records
    });
    Child { life, proc, reader, acked }
}

/// Kills (if still running) and reaps a child; returns its records and whether SIGKILL ended it.
pub fn reap(mut c: Child, kill: bool) -> (Vec<String>, bool) {
    if kill {
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe { libc::kill(c.proc.id() as libc::pid_t, libc::SIGKILL) };
    }
    let status = c.proc.wait().expect("wait child");
    let records = c.reader.join().expect("reader");
    (records, status.signal() == Some(libc::SIGKILL))
}

/// A dict's expected contents, in insertion order, rebuilt from acknowledged records.
#[derive(Clone, Default, PartialEq, Debug)]
struct Contents(Vec<(Vec<u8>, Vec<u8>)>);

impl Contents {
    fn apply(&mut self, rec: &[&str]) {
        match rec {
            ["S", key, seed, len] => {
                let v = value(seed.parse().unwrap(), len.parse().unwrap());
                match self.0.iter_mut().find(|(k, _)| k == key.as_bytes()) {
                    Some(e) => e.1 = v,
                    None => self.0.push((key.as_bytes().to_vec(), v)),
                }
            }
            ["D", key] => self.0.retain(|(k, _)| k != key.as_bytes()),
            ["K"] => self.0.clear(),
            _ => {}
        }
    }
}

/// What the script child acknowledged, and what it had begun when it died.
#[derive(Default)]
struct ScriptLog {
    dict: Option<(u64, Vec<u8>)>,
    acked: Contents,
    in_flight: Option<Vec<String>>,
    acked_ops: HashSet<String>,
    begun_ops: HashSet<String>,
}

fn read_script(records: &[String]) -> ScriptLog {
    let mut log = ScriptLog::default();
    let mut pending: Option<Vec<String>> = None;
    for r in records {
        let f: Vec<&str> = r.split(' ').collect();
        match f[0] {
            "B" => {
                log.begun_ops.insert(f[1].to_string());
                pending = Some(f[1..].iter().map(|s| s.to_string()).collect());
            }
            "A" => {
                log.acked_ops.insert(f[1].to_string());
                if f[1] == "N" {
                    log.dict = Some((f[2].parse().unwrap(), unhex(f[3])));
                } else if let Some(p) = pending.take() {
                    let p: Vec<&str> = p.iter().map(String::as_str).collect();
                    log.acked.apply(&p);
                }
                pending = None;
            }
            _ => {}
        }
    }
    log.in_flight = pending;
    log
}

/// Kills the script child at the n-th passage of `point` and checks what it left.
fn kill_script_at(point: &str, n: u64) {
    let path = temp_path("crash");
    let _store = TempStore { store: Store::create(&path, 8 << 20, 1).unwrap(), path: path.clone() };
    let envs = [(child::ROLE, "script".to_string()), (child::PATH, path.display().to_string()), ("PYPORT_SHM_CRASH", format!("{point}:{n}"))];
    let (records, killed) = reap(spawn(&envs, 0), false);
    assert!(killed, "{point}:{n}: the child was not killed there (never reached?): {records:?}");
    let store = Store::open(&path).unwrap();
    let log = read_script(&records);
    let ctx = format!("{point}:{n} after {:?}", records.last());
    assert_clean(&store);
    assert!(store.stats().recoveries >= 1, "{ctx}: no lock was found held by the dead child");
    let Some((id, token)) = log.dict.clone() else {
        // Killed while creating: at most that one dict exists, owned by owner 1.
        assert!(store.drop_owner(&owner(1), &Ungated).unwrap().len() <= 1, "{ctx}");
        return assert_clean(&store);
    };
    let d = match store.lookup(id, &token) {
        Ok(d) => d,
        Err(Error::Destroyed) => {
            assert!(log.begun_ops.contains("X"), "{ctx}: the dict is gone but nobody destroyed it");
            return assert_clean(&store);
        }
        Err(e) => panic!("{ctx}: {e:?}"),
    };
    assert!(!log.acked_ops.contains("X"), "{ctx}: an acknowledged destroy did not happen");
    check_script_contents(&ctx, &d, &log);
    check_script_owner(&ctx, &store, &d, &log);
    // The repaired dict works like any other.
    d.set(b"after", b"recovery", &Ungated).unwrap();
    assert_eq!(d.get(b"after").unwrap().unwrap().0, b"recovery");
    assert_clean(&store);
}

fn check_script_contents(ctx: &str, d: &DictRef, log: &ScriptLog) {
    let items = Contents(d.items().unwrap());
    let mut with = log.acked.clone();
    if let Some(p) = &log.in_flight {
        with.apply(&p.iter().map(String::as_str).collect::<Vec<_>>());
    }
    assert!(items == log.acked || items == with, "{ctx}: contents are neither the acknowledged state nor it plus the write in flight");
}

fn check_script_owner(ctx: &str, store: &Store, d: &DictRef, log: &ScriptLog) {
    let now = store.owner(d.id(), d.token()).unwrap();
    if log.acked_ops.contains("G") {
        assert_eq!(now, owner(2), "{ctx}");
    } else if !log.begun_ops.contains("G") {
        assert_eq!(now, owner(1), "{ctx}");
    } else {
        assert!(now == owner(1) || now == owner(2), "{ctx}: a half-written owner");
    }
}

/// A writer killed at every step of every change (between writing and publishing, between
/// publishing and freeing, inside the allocator's split, merge and growth of the heap, in
/// create, give_away, clear and destroy) loses nothing acknowledged, exposes nothing half
/// written, and leaves locks the next process repairs.
#[test]
fn a_writer_killed_at_each_step_of_the_protocol_loses_nothing() {
    let points: &[(&str, &[u64])] = &[
        ("create.before_live", &[1]),
        ("owner.written", &[1, 2]),
        ("heap.bump", &[1, 2, 30]),
        ("heap.split", &[1, 4]),
        ("heap.free", &[1, 10]),
        ("set.inserted", &[1, 7, 42]),
        ("set.replaced", &[1, 40]),
        ("table.grown", &[1, 3, 5]),
        ("del.removed", &[1, 20]),
        ("clear.committed", &[1, 2]),
        ("table.free_entry", &[1, 15, 22]),
        ("destroy.committed", &[1]),
    ];
    let mut kills = 0;
    for (point, ns) in points {
        for n in *ns {
            kill_script_at(point, *n);
            kills += 1;
        }
    }
    eprintln!("shm crash points: {kills} kills, every one repaired and checked");
}
