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
//! 7. `written`: the reply frame has been written to the pipe and flushed.
//!
//! Only durations between stamps leave the port (clocks of the VM and of this process
//! are never compared), as medians over the calls traced since the previous `stats`
//! request (see [`drain`]). Stamps go from the reader to the worker through a small map
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
pub const STAGES: [&str; 6] = ["route_ns", "queue_ns", "prepare_ns", "python_ns", "encode_ns", "write_ns"];

/// Most traced calls kept between two `stats` requests (the oldest are dropped).
const KEEP: usize = 4096;
/// Requests routed but never taken by a worker (nested in callbacks, or lost with a
/// written-off worker) would otherwise pile up in `ARRIVALS`.
const MAX_ARRIVALS: usize = 10_000;

/// Request id => (read, routed), from the reader to whichever worker takes the job.
static ARRIVALS: LazyLock<Mutex<HashMap<u64, (Instant, Instant)>>> = LazyLock::new(Default::default);
/// Durations of the calls traced since the last `drain`.
static DONE: LazyLock<Mutex<VecDeque<[u64; 6]>>> = LazyLock::new(Default::default);

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
    fn durations(&self, written: Instant) -> Option<[u64; 6]> {
        let points = [self.read, self.routed, self.dequeued, self.call_start?, self.call_end?, self.encoded?, written];
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

/// This thread has written the reply of the request it ran: its trace is complete.
#[inline]
pub fn written() {
    if enabled() {
        finish_on_this_thread();
    }
}

fn finish_on_this_thread() {
    let written = Instant::now();
    let Some(stamps) = CURRENT.with(|c| c.borrow_mut().take()) else { return };
    if let Some(d) = stamps.durations(written) {
        let mut done = DONE.lock();
        if done.len() >= KEEP {
            done.pop_front();
        }
        done.push_back(d);
    }
}

/// Medians (ns) per stage over the calls traced since the previous drain, and how many
/// calls that was; forgets them. None when tracing is off.
pub fn drain() -> Option<(u64, [u64; 6])> {
    if !enabled() {
        return None;
    }
    let done: Vec<[u64; 6]> = std::mem::take(&mut *DONE.lock()).into();
    let mut medians = [0u64; 6];
    for (stage, m) in medians.iter_mut().enumerate() {
        let mut column: Vec<u64> = done.iter().map(|d| d[stage]).collect();
        *m = median(&mut column);
    }
    Some((done.len() as u64, medians))
}

/// The median of `v` (the lower middle one of an even count); 0 for none.
fn median(v: &mut [u64]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [5, 1, 3]), 3);
        assert_eq!(median(&mut [4, 1, 3, 2]), 2);
        assert_eq!(median(&mut []), 0);
    }

    #[test]
    fn durations_need_every_stamp() {
        let t = Instant::now();
        let ms = |n| t + std::time::Duration::from_millis(n);
        let mut s = Stamps { read: t, routed: ms(1), dequeued: ms(3), call_start: Some(ms(6)), call_end: Some(ms(10)), encoded: None };
        assert_eq!(s.durations(ms(20)), None);
        s.encoded = Some(ms(15));
        assert_eq!(s.durations(ms(21)), Some([1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000, 6_000_000]));
    }
}
