//! Where the time of a call goes inside the port: an optional breakdown for the benchmark.
//!
//! Off unless the port was started with `--trace-latency 1` (app env `trace_latency`). When
//! off, every hook below is one relaxed atomic load and a branch. When on, each `call`
//! request is stamped with the monotonic clock (`Instant`) at six points, in order:
//!
//! 1. `read`: the reader thread has the whole frame;
//! 2. `routed`: the envelope is decoded, the job is about to go to the pool;
//! 3. `dequeued`: a worker has taken the job off its queue;
//! 4. `call_start`: the function is resolved and its arguments decoded; the call begins;
//! 5. `call_end`: the Python function has returned;
//! 6. `encoded`: the reply frame is built;
//! 7. `writing`: the GIL is released and the frame is about to be written.
//!
//! The write itself is not a stage: on a single CPU, `write(2)` wakes the VM, which can run
//! its whole side of the reply before the call returns here, so a stamp after it would
//! overlap the VM's stages. It belongs to the part nobody can time (the pipes).
//!
//! Only durations between stamps leave the port (clocks of the VM and of this process
//! are never compared), per request id, for the calls traced since the previous `stats`
//! request (see [`drain`]), so that the benchmark can join them with its own per-call
//! stages. Stamps go from the reader to the worker through a small map
//! keyed by request id, and stay on the worker thread in a thread-local in between.
//! Meant for plain sequential calls: a call nested in a callback runs on the thread of the
//! call waiting for it and stamps over that call's points.

use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Stage names, in the order of [`Stamps::durations`]; each is the time from one stamp
/// to the next.
pub const STAGES: [&str; 6] = ["route_ns", "queue_ns", "prepare_ns", "python_ns", "encode_ns", "release_ns"];

/// Most traced calls kept between two `stats` requests (the oldest are dropped).
const KEEP: usize = 4096;
/// Requests routed but never taken by a worker (nested in callbacks, or lost with a
/// written-off worker) would otherwise pile up in `ARRIVALS`.
const MAX_ARRIVALS: usize = 10_000;

/// Request id => (read, routed), from the reader to whichever worker takes the job.
static ARRIVALS: LazyLock<Mutex<HashMap<u64, (Instant, Instant)>>> = LazyLock::new(Default::default);
/// Request id and stage durations of the calls traced since the last `drain`.
static DONE: LazyLock<Mutex<VecDeque<(u64, [u64; 6])>>> = LazyLock::new(Default::default);

thread_local! {
    /// The traced request this worker thread is running, if any.
    static CURRENT: RefCell<Option<Stamps>> = const { RefCell::new(None) };
}

/// The points a worker stamps inside the call itself.
#[derive(Clone, Copy)]
pub enum Mark {
    CallStart,
    CallEnd,
    Encoded,
}

struct Stamps {
    id: u64,
    read: Instant,
    routed: Instant,
    dequeued: Instant,
    call_start: Option<Instant>,
    call_end: Option<Instant>,
    encoded: Option<Instant>,
}

impl Stamps {
    /// The six stage durations in ns, if every stamp was taken (an `eval`, or a builtin
    /// that reads the caller's namespace, never stamps `call_start`: not a plain call).
    fn durations(&self, writing: Instant) -> Option<[u64; 6]> {
        let points = [self.read, self.routed, self.dequeued, self.call_start?, self.call_end?, self.encoded?, writing];
        let mut out = [0u64; 6];
        for (i, d) in out.iter_mut().enumerate() {
            *d = points[i + 1].saturating_duration_since(points[i]).as_nanos() as u64;
        }
        Some(out)
    }
}

/// Turns tracing on (once, at start-up, before any request is read).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The time now if tracing is on: the reader's stamp for a frame it has just read.
#[inline]
pub fn now() -> Option<Instant> {
    if enabled() {
        Some(Instant::now())
    } else {
        None
    }
}

/// The reader is about to hand request `id`, read at `read`, to the pool.
pub fn routed(id: u64, read: Instant) {
    let mut arrivals = ARRIVALS.lock();
    if arrivals.len() >= MAX_ARRIVALS {
        arrivals.clear();
    }
    arrivals.insert(id, (read, Instant::now()));
}

/// A worker has taken request `id` off its queue.
#[inline]
pub fn dequeued(id: u64) {
    if enabled() {
        start_on_this_thread(id);
    }
}

fn start_on_this_thread(id: u64) {
    let dequeued = Instant::now();
    let arrival = ARRIVALS.lock().remove(&id);
    let stamps = arrival.map(|(read, routed)| Stamps {
        id,
        read,
        routed,
        dequeued,
        call_start: None,
        call_end: None,
        encoded: None,
    });
    CURRENT.with(|c| *c.borrow_mut() = stamps);
}

/// Stamps a point of the request this thread runs (if it is traced).
#[inline]
pub fn mark(m: Mark) {
    if enabled() {
        stamp(m);
    }
}

fn stamp(m: Mark) {
    let t = Instant::now();
    CURRENT.with(|c| {
        if let Some(s) = c.borrow_mut().as_mut() {
            match m {
                Mark::CallStart => s.call_start = Some(t),
                Mark::CallEnd => s.call_end = Some(t),
                Mark::Encoded => s.encoded = Some(t),
            }
        }
    });
}

/// This thread, detached from Python, is about to write the reply of the request it ran:
/// its trace is complete.
#[inline]
pub fn writing() {
    if enabled() {
        finish_on_this_thread();
    }
}

fn finish_on_this_thread() {
    let writing = Instant::now();
    let Some(stamps) = CURRENT.with(|c| c.borrow_mut().take()) else { return };
    if let Some(d) = stamps.durations(writing) {
        let mut done = DONE.lock();
        if done.len() >= KEEP {
            done.pop_front();
        }
        done.push_back((stamps.id, d));
    }
}

/// Request id and stage durations (ns, in the order of [`STAGES`]) of the calls traced
/// since the previous drain, oldest first; forgets them. None when tracing is off.
pub fn drain() -> Option<Vec<(u64, [u64; 6])>> {
    if !enabled() {
        return None;
    }
    Some(std::mem::take(&mut *DONE.lock()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_every_stamp() {
        let t = Instant::now();
        let ms = |n| t + std::time::Duration::from_millis(n);
        let mut s = Stamps { id: 1, read: t, routed: ms(1), dequeued: ms(3), call_start: Some(ms(6)), call_end: Some(ms(10)), encoded: None };
        assert_eq!(s.durations(ms(20)), None);
        s.encoded = Some(ms(15));
        assert_eq!(s.durations(ms(21)), Some([1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000, 6_000_000]));
    }
}
