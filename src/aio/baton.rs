//! The baton: which of the event loop's threads runs the loop now.
//!
//! One thread at a time holds the baton and runs the loop (the driver). A driver that must
//! wait outside Python in the middle of a task (a callback into Erlang) passes the baton on
//! and, when its wait is over, queues to get it back: the driver then hands it over at the
//! next boundary between two callbacks and parks. The baton goes, in this order, to a
//! thread waiting to resume, to a parked thread, or to a new thread. A driver the watcher
//! wrote off (stuck in one callback) loses the baton at once; when it comes back, if ever,
//! it leaves.
//!
//! Nothing here touches Python: waits happen detached from the interpreter.

use parking_lot::{Condvar, Mutex};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Parked threads kept for the next hand-over; more leave.
const MAX_PARKED: usize = 1;

/// Who gets the baton after a hand-over.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Next {
    /// A thread that waits for it (resuming or parked): wake it.
    Wake(u64),
    /// Nobody: a new thread with this token must start and drive.
    Spawn(u64),
}

/// What a driver does at a boundary between two callbacks.
#[derive(Debug, PartialEq, Eq)]
pub enum Boundary {
    /// Go on driving.
    Drive,
    /// The baton went to a resuming thread (wake it), this one parks.
    HandedOver(Next),
    /// This thread was written off: it stops and leaves (handing on the baton if, by a
    /// race, it held it again).
    Leave(Option<Next>),
}

#[derive(Default, Debug)]
struct State {
    holder: Option<u64>,
    /// Threads whose wait is over, oldest first, to resume the step they were in, and
    /// since when each waits.
    resuming: VecDeque<(u64, Instant)>,
    /// Idle threads at a boundary, ready to drive.
    parked: Vec<u64>,
    /// Threads written off while they held the baton, until they come back.
    written_off: HashSet<u64>,
    next_token: u64,
}

impl State {
    /// The holder is gone: the next one.
    fn hand_on(&mut self) -> Next {
        debug_assert!(self.holder.is_none());
        let next = match self.resuming.pop_front() {
            Some((t, _)) => Next::Wake(t),
            None => match self.parked.pop() {
                Some(t) => Next::Wake(t),
                None => {
                    self.next_token += 1;
                    Next::Spawn(self.next_token)
                }
            },
        };
        self.holder = Some(match next {
            Next::Wake(t) | Next::Spawn(t) => t,
        });
        next
    }

    /// Whether a hand-over now would need a new thread.
    fn needs_new_thread(&self) -> bool {
        self.resuming.is_empty() && self.parked.is_empty()
    }
}

pub struct Baton {
    state: Mutex<State>,
    changed: Condvar,
    /// Set while some thread waits to resume or a driver was written off: drivers look at
    /// the state only then, so that a boundary costs one atomic load.
    attention: AtomicBool,
}

impl Default for Baton {
    fn default() -> Self {
        Baton { state: Mutex::new(State::default()), changed: Condvar::new(), attention: AtomicBool::new(false) }
    }
}

impl Baton {
    /// The first driver's token: it holds the baton from the start.
    pub fn first(&self) -> u64 {
        let mut s = self.state.lock();
        s.next_token += 1;
        s.holder = Some(s.next_token);
        s.next_token
    }

    pub fn holds(&self, me: u64) -> bool {
        self.state.lock().holder == Some(me)
    }

    /// A driver between two callbacks.
    pub fn at_boundary(&self, me: u64) -> Boundary {
        if !self.attention.load(Ordering::Acquire) {
            return Boundary::Drive;
        }
        let mut s = self.state.lock();
        if s.written_off.contains(&me) || s.holder != Some(me) {
            // A written-off driver (the only one that loses the baton without giving it).
            let next = (s.holder == Some(me)).then(|| {
                s.holder = None;
                s.hand_on()
            });
            self.refresh(&s);
            self.changed.notify_all();
            return Boundary::Leave(next);
        }
        match s.resuming.pop_front() {
            Some((t, _)) => {
                s.holder = Some(t);
                self.refresh(&s);
                self.changed.notify_all();
                Boundary::HandedOver(Next::Wake(t))
            }
            None => Boundary::Drive,
        }
    }

    /// Whether passing the baton on now would need a new thread (the caller then reserves
    /// one first, see `threads`).
    pub fn needs_new_thread(&self) -> bool {
        self.state.lock().needs_new_thread()
    }

    /// The holder is about to wait outside Python: it passes the baton on. None when `me`
    /// does not hold it (written off meanwhile): nothing changes.
    pub fn leave_for_wait(&self, me: u64) -> Option<Next> {
        let mut s = self.state.lock();
        if s.holder != Some(me) || s.written_off.contains(&me) {
            return None;
        }
        s.holder = None;
        let next = s.hand_on();
        self.changed.notify_all();
        Some(next)
    }

    /// A thread that holds the baton cannot drive (it could not set up): the baton goes to
    /// a thread that waits for it, if any. False when none does.
    pub fn pass_to_waiting(&self, me: u64) -> bool {
        let mut s = self.state.lock();
        if s.holder != Some(me) || (s.resuming.is_empty() && s.parked.is_empty()) {
            return false;
        }
        s.holder = None;
        s.hand_on();
        self.refresh(&s);
        self.changed.notify_all();
        true
    }

    /// Since when the oldest thread that waits to resume has waited (work waiting for the
    /// loop, for the watcher).
    pub fn waiting_since(&self) -> Option<Instant> {
        self.state.lock().resuming.front().map(|(_, since)| *since)
    }

    /// A thread whose wait is over queues for the baton; the driver hands it over at its
    /// next boundary (the caller wakes the loop, then calls [`Baton::wait_for`]).
    pub fn want_back(&self, me: u64) {
        let mut s = self.state.lock();
        if s.holder.is_none() {
            s.holder = Some(me);
        } else {
            s.resuming.push_back((me, Instant::now()));
        }
        self.refresh(&s);
    }

    /// Waits until `me` holds the baton. Call it detached from Python.
    pub fn wait_for(&self, me: u64) {
        let mut s = self.state.lock();
        while s.holder != Some(me) {
            self.changed.wait(&mut s);
        }
    }

    /// A driver that handed the baton over parks, to drive again later. Returns false
    /// when enough threads are parked already: it leaves instead. Call it detached.
    pub fn park(&self, me: u64) -> bool {
        let mut s = self.state.lock();
        if s.parked.len() >= MAX_PARKED {
            return false;
        }
        s.parked.push(me);
        while s.holder != Some(me) {
            self.changed.wait(&mut s);
        }
        true
    }

    /// A new driver could not start: the baton goes back to `to`, which had it.
    pub fn spawn_failed(&self, spawned: u64, to: u64) {
        let mut s = self.state.lock();
        if s.holder == Some(spawned) {
            s.holder = Some(to);
        }
        self.changed.notify_all();
    }

    /// The watcher writes off the holder `me` (stuck in one callback): the baton moves on
    /// at once, and `me` leaves at its next boundary.
    pub fn write_off(&self, me: u64) -> Option<Next> {
        let mut s = self.state.lock();
        if s.holder != Some(me) {
            return None;
        }
        s.written_off.insert(me);
        s.holder = None;
        let next = s.hand_on();
        self.refresh(&s);
        self.changed.notify_all();
        Some(next)
    }

    /// Whether `me` was written off and has not come back yet.
    pub fn is_written_off(&self, me: u64) -> bool {
        self.state.lock().written_off.contains(&me)
    }

    /// A written-off thread came back and leaves; true if it was written off.
    pub fn returned(&self, me: u64) -> bool {
        let mut s = self.state.lock();
        let was = s.written_off.remove(&me);
        self.refresh(&s);
        was
    }

    /// Threads written off and still stuck.
    pub fn written_off(&self) -> usize {
        self.state.lock().written_off.len()
    }

    fn refresh(&self, s: &State) {
        self.attention.store(!s.resuming.is_empty() || !s.written_off.is_empty(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_hands_the_baton_to_a_new_thread_then_takes_it_back_at_a_boundary() {
        let b = Baton::default();
        let first = b.first();
        assert_eq!(b.at_boundary(first), Boundary::Drive);
        assert!(b.needs_new_thread());
        let Some(Next::Spawn(second)) = b.leave_for_wait(first) else { panic!("nobody else could drive") };
        assert!(b.holds(second) && !b.holds(first));
        // The first thread's wait is over: the second hands over at its next boundary.
        b.want_back(first);
        assert_eq!(b.at_boundary(second), Boundary::HandedOver(Next::Wake(first)));
        assert!(b.holds(first));
        // The second parks; the next wait of the first wakes it instead of a new thread.
        let parker = std::thread::scope(|scope| {
            let p = scope.spawn(|| b.park(second));
            while b.needs_new_thread() {
                std::thread::yield_now();
            }
            assert_eq!(b.leave_for_wait(first), Some(Next::Wake(second)));
            p.join().unwrap()
        });
        assert!(parker, "it drives again");
        assert!(b.holds(second));
    }

    #[test]
    fn resuming_threads_come_before_parked_ones_in_order() {
        let b = Baton::default();
        let d = b.first();
        b.want_back(11);
        b.want_back(12);
        assert_eq!(b.at_boundary(d), Boundary::HandedOver(Next::Wake(11)));
        // 11 finishes its step and waits again: 12 (resuming) gets it, not a new thread.
        assert!(b.waiting_since().is_some(), "12 still waits");
        assert_eq!(b.leave_for_wait(11), Some(Next::Wake(12)));
        assert!(b.waiting_since().is_none());
        assert_eq!(b.at_boundary(12), Boundary::Drive);
    }

    #[test]
    fn a_written_off_driver_loses_the_baton_at_once_and_leaves_when_it_comes_back() {
        let b = Baton::default();
        let stuck = b.first();
        let Some(Next::Spawn(fresh)) = b.write_off(stuck) else { panic!("a fresh driver takes over") };
        assert!(b.holds(fresh));
        assert_eq!(b.written_off(), 1);
        assert_eq!(b.write_off(stuck), None, "only the holder can be written off");
        assert_eq!(b.at_boundary(fresh), Boundary::Drive);
        assert_eq!(b.at_boundary(stuck), Boundary::Leave(None));
        assert_eq!(b.leave_for_wait(stuck), None, "a written-off thread cannot pass the baton on");
        assert!(b.is_written_off(stuck), "it counts until it leaves");
        assert!(b.returned(stuck));
        assert_eq!(b.written_off(), 0);
        assert!(!b.returned(stuck), "once");
    }

    #[test]
    fn only_one_thread_parks() {
        let b = Baton::default();
        let d = b.first();
        let Some(Next::Spawn(e)) = b.leave_for_wait(d) else { panic!() };
        std::thread::scope(|scope| {
            let p = scope.spawn(|| b.park(100));
            while b.needs_new_thread() {
                std::thread::yield_now();
            }
            assert!(!b.park(101), "a second idle thread leaves");
            // Wake the parked one so that the scope can end.
            assert_eq!(b.leave_for_wait(e), Some(Next::Wake(100)));
            assert!(p.join().unwrap());
        });
    }
}
