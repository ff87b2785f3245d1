//! Home threads: which worker thread serves a process's requests.
//!
//! Objects that belong to the thread that made them (an `sqlite3` connection, a
//! `threading.local`, a per-thread event loop, C libraries with thread-local state) break when
//! a process's next call runs on another worker. So a process with a namespace gets a *home*:
//! one worker that serves every later request of that process, until its namespace is freed.
//! Requests of processes without a home float to any free worker, as before.
//!
//! This module is the policy and the bookkeeping, with no threads and no Python: the pool asks
//! it where a request goes and tells it when workers come, go, or are written off.

use crate::protocol::Owner;
use std::collections::HashMap;

/// Which processes get a home thread (app env `thread_affinity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// A process gets a home when its namespace is created (default).
    Namespace,
    /// Every process gets a home on its first request.
    Always,
    /// Nobody has a home: every request floats to any free worker.
    None,
}

impl Affinity {
    pub fn parse(s: &str) -> Option<Affinity> {
        match s {
            "namespace" => Some(Affinity::Namespace),
            "always" => Some(Affinity::Always),
            "none" => Some(Affinity::None),
            _ => None,
        }
    }

    /// Whether a request that does (`uses_namespace`) or does not use its process's namespace
    /// gives a process without a home one.
    pub fn wants_home(self, uses_namespace: bool) -> bool {
        match self {
            Affinity::Namespace => uses_namespace,
            Affinity::Always => true,
            Affinity::None => false,
        }
    }
}

/// A worker as the policy sees it when it chooses a home.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub worker: usize,
    /// Running a request, or with requests waiting in its own queue.
    pub busy: bool,
    /// Requests queued for it, plus one if it is running one.
    pub load: usize,
    pub homes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Worker(usize),
    /// Start a new worker and make it the home.
    Spawn,
}

/// Where a new home goes, so that a long call delays as few others as possible: an idle
/// worker (the one with the fewest homes); else a new worker while the pool may grow; else
/// the worker with the fewest homes, then the least load. Never a busy worker while an idle
/// one or a new one is available.
pub fn choose(candidates: &[Candidate], can_spawn: bool) -> Choice {
    if let Some(c) = candidates.iter().filter(|c| !c.busy).min_by_key(|c| (c.homes, c.worker)) {
        return Choice::Worker(c.worker);
    }
    if can_spawn || candidates.is_empty() {
        return Choice::Spawn;
    }
    let c = candidates.iter().min_by_key(|c| (c.homes, c.load, c.worker));
    c.map_or(Choice::Spawn, |c| Choice::Worker(c.worker))
}

/// Which process is homed where.
#[derive(Default)]
pub struct HomeTable {
    home_of: HashMap<Owner, usize>,
    count: HashMap<usize, usize>,
}

impl HomeTable {
    pub fn home_of(&self, owner: &Owner) -> Option<usize> {
        self.home_of.get(owner).copied()
    }

    pub fn homes_on(&self, worker: usize) -> usize {
        self.count.get(&worker).copied().unwrap_or(0)
    }

    pub fn set(&mut self, owner: Owner, worker: usize) {
        if let Some(old) = self.home_of.insert(owner, worker) {
            self.dec(old);
        }
        *self.count.entry(worker).or_insert(0) += 1;
    }

    /// The owner's namespace is gone: so is its home.
    pub fn remove(&mut self, owner: &Owner) {
        if let Some(w) = self.home_of.remove(owner) {
            self.dec(w);
        }
    }

    /// The processes homed on `worker`.
    pub fn owners_on(&self, worker: usize) -> Vec<Owner> {
        self.home_of.iter().filter(|(_, w)| **w == worker).map(|(o, _)| o.clone()).collect()
    }

    fn dec(&mut self, worker: usize) {
        if let Some(n) = self.count.get_mut(&worker) {
            *n -= 1;
            if *n == 0 {
                self.count.remove(&worker);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(worker: usize, busy: bool, load: usize, homes: usize) -> Candidate {
        Candidate { worker, busy, load, homes }
    }

    fn owner(n: u32) -> Owner {
        Owner::new("n@h", n, 0, 1)
    }

    #[test]
    fn idle_worker_with_fewest_homes_first() {
        let cs = [c(0, false, 0, 3), c(1, true, 1, 0), c(2, false, 0, 1)];
        assert_eq!(choose(&cs, true), Choice::Worker(2));
    }

    #[test]
    fn never_a_busy_worker_while_the_pool_can_grow() {
        let cs = [c(0, true, 1, 0), c(1, true, 2, 0)];
        assert_eq!(choose(&cs, true), Choice::Spawn);
        assert_eq!(choose(&[], false), Choice::Spawn);
    }

    #[test]
    fn at_the_cap_fewest_homes_then_least_load() {
        let cs = [c(0, true, 1, 2), c(1, true, 5, 1), c(2, true, 2, 1)];
        assert_eq!(choose(&cs, false), Choice::Worker(2));
    }

    #[test]
    fn table_counts_follow_moves_and_removals() {
        let mut t = HomeTable::default();
        t.set(owner(1), 0);
        t.set(owner(2), 0);
        t.set(owner(3), 1);
        assert_eq!((t.homes_on(0), t.homes_on(1)), (2, 1));
        t.set(owner(1), 1);
        assert_eq!((t.homes_on(0), t.homes_on(1)), (1, 2));
        let mut on1 = t.owners_on(1);
        on1.sort_by_key(|p| p.id);
        assert_eq!(on1, vec![owner(1), owner(3)]);
        t.remove(&owner(1));
        t.remove(&owner(1));
        assert_eq!((t.homes_on(0), t.homes_on(1), t.home_of(&owner(1))), (1, 1, None));
    }

    #[test]
    fn affinity_modes() {
        assert_eq!(Affinity::parse("namespace"), Some(Affinity::Namespace));
        assert_eq!(Affinity::parse("bogus"), None);
        assert!(Affinity::Namespace.wants_home(true) && !Affinity::Namespace.wants_home(false));
        assert!(Affinity::Always.wants_home(false));
        assert!(!Affinity::None.wants_home(true));
    }
}
