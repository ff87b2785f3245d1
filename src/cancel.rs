//! Cancelling requests whose Erlang caller gave up, writing off workers stuck in code that
//! ignores it, and the GIL watchdog.
//!
//! Raising `erlang.CallCancelled` in a worker needs the GIL, and C code can hold the GIL for
//! ever (`sum(range(10**11))`, a catastrophic regular expression). A canceller that waits for
//! the GIL would wait with it, and every later cancellation behind it. So the work is split
//! between two threads:
//!
//! * the **canceller** never attaches to Python. It takes cancel requests, drops queued
//!   requests, hands running ones to the raiser, writes off workers whose request still runs
//!   `abandon_after` after its cancellation (blocked in C, e.g. a long `time.sleep`), and is
//!   the watchdog: a cancellation that the raiser has not delivered `gil_watchdog` after it
//!   was asked for means that something holds the GIL and will not let go. Only a new port
//!   cures that: it logs every running request (the culprit is the one whose thread kept
//!   burning CPU) and exits with [`EXIT_GIL_WATCHDOG`].
//! * the **raiser** attaches to Python for each cancellation and raises the exception in the
//!   worker, only while that same request still runs there (checked under the GIL, so the
//!   worker cannot move on to another request between the check and the raise).
//!
//! Long GIL-holding work whose caller still waits never involves the watchdog: only a
//! caller that gave up (timed out or died) asks for a cancellation.

use crate::framing::Outbox;
use crate::protocol::{self, Owner};
use crate::pymodule::CallCancelled;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Exit status when too many workers are stuck in code that ignores cancellation.
pub const EXIT_STUCK_WORKERS: i32 = 6;
/// Exit status when a cancellation could not get the GIL within the watchdog's time.
pub const EXIT_GIL_WATCHDOG: i32 = 7;

/// A worker thread as the canceller sees it.
pub struct Slot {
    /// The pool the worker belongs to (a number unique in the process).
    pool: usize,
    /// The pool's number for the worker.
    worker: usize,
    /// CPython's id for the thread (`threading.get_ident()`), the target of the raise.
    ident: std::os::raw::c_ulong,
    /// The kernel's id for the thread, to read its CPU time from `/proc`.
    tid: libc::pid_t,
    /// A cancellation was raised in the thread and its request has not ended yet: the
    /// nesting depth of that request (see `nesting`), `NOT_CANCELLED` when there is none.
    /// Code that waits outside Python (a callback into Erlang) looks at it, since the raised
    /// exception only shows once Python code runs again. The outermost cancelled request is
    /// kept: a nested request ending must not take back its caller's cancellation.
    cancelled: AtomicUsize,
    /// How many requests run nested in callbacks on this thread just now: the worker's own
    /// request is depth 0, one made in a callback it waits for is 1, and so on. Only the
    /// thread itself changes it.
    nesting: AtomicUsize,
    /// A pool's worker, whose depth 0 is a request; false for a thread of the event loop,
    /// whose depth 0 is the loop (only the requests nested in its callbacks are watched).
    runs_requests: bool,
}

const NOT_CANCELLED: usize = usize::MAX;

thread_local! {
    /// The worker slot of the current thread, if it is a pool worker.
    static CURRENT_SLOT: std::cell::RefCell<Option<Arc<Slot>>> = const { std::cell::RefCell::new(None) };
}

/// Marks the current thread as the worker of `slot` (for its whole life).
pub fn set_current_slot(slot: Arc<Slot>) {
    CURRENT_SLOT.with(|c| *c.borrow_mut() = Some(slot));
}

/// Takes back the cancellation raised asynchronously in the current thread (a worker) and
/// not seen yet: code that reports the cancellation itself (a wait for a callback ending with
/// `CallCancelled`) must not have a second one hit the handler that catches the first.
pub fn take_current_cancel(py: Python<'_>) {
    CURRENT_SLOT.with(|c| {
        if let Some(slot) = c.borrow().as_ref() {
            // SAFETY: the GIL is held (the token proves it); NULL clears the pending exception.
            unsafe {
                ffi::PyThreadState_SetAsyncExc(slot.ident as _, std::ptr::null_mut());
            }
            let _ = py;
        }
    });
}

/// Whether the current thread runs a request that has been cancelled; `None` when it runs
/// none (not a worker, or an event loop's thread outside a nested request): its waits need
/// deadlines of their own.
pub fn current_cancelled() -> Option<bool> {
    CURRENT_SLOT.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|s| s.runs_requests || s.nesting.load(Ordering::Acquire) > 0)
            .map(|s| s.cancelled.load(Ordering::Acquire) != NOT_CANCELLED)
    })
}

/// The worker slot of the current thread, if it is a pool worker.
pub fn current_slot() -> Option<Arc<Slot>> {
    CURRENT_SLOT.with(|c| c.borrow().clone())
}

impl Slot {
    /// The calling thread, worker number `worker`, which must be attached to Python.
    pub fn current(pool: usize, worker: usize) -> Slot {
        // SAFETY: plain queries of the calling thread's ids.
        let (ident, tid) = unsafe { (ffi::PyThread_get_thread_ident(), libc::gettid()) };
        Slot {
            pool,
            worker,
            ident,
            tid,
            cancelled: AtomicUsize::new(NOT_CANCELLED),
            nesting: AtomicUsize::new(0),
            runs_requests: true,
        }
    }

    /// The calling thread, one of the event loop's, attached to Python: pool `pool` watches
    /// the requests nested in its callbacks (it is no worker of that pool: a write-off of
    /// it moves no homes).
    pub fn loop_thread(pool: usize) -> Slot {
        Slot { worker: usize::MAX, runs_requests: false, ..Slot::current(pool, usize::MAX) }
    }

    /// Clears an exception raised asynchronously in this thread that it has not seen yet,
    /// so that a cancellation that arrived after its request finished cannot hit the next.
    pub fn clear_pending_cancel(&self, _py: Python<'_>) {
        self.cancelled.store(NOT_CANCELLED, Ordering::Release);
        // SAFETY: the GIL is held (the token proves it); NULL clears the pending exception.
        unsafe {
            ffi::PyThreadState_SetAsyncExc(self.ident as _, std::ptr::null_mut());
        }
    }

    /// The pool the worker belongs to.
    pub fn pool(&self) -> usize {
        self.pool
    }

    /// A request nested in a callback starts on this thread (the calling one): its depth.
    pub fn enter_nested(&self) -> usize {
        self.nesting.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The nested request of depth `depth` has ended. A cancellation raised for it that it
    /// never saw is taken back, so that it cannot strike the request it was nested in; one
    /// raised for an outer request stays. Called with the GIL held, as the raiser raises
    /// with it held: nothing is raised between the look and the clearing.
    pub fn leave_nested(&self, py: Python<'_>, depth: usize) {
        self.nesting.fetch_sub(1, Ordering::AcqRel);
        if self.cancelled.load(Ordering::Acquire) == depth {
            self.clear_pending_cancel(py);
        }
    }
}

/// What the logs say about a running request. Asked only when a log line is written, so
/// that describing a request costs nothing on the way to running it.
pub trait Describe: Send + Sync {
    /// The process whose request it is (none for start-up code and SharedDict reads, which
    /// `what` names).
    fn caller(&self) -> Option<&Owner>;
    /// What it runs: `call math.sqrt`, `eval <first line>`.
    fn what(&self) -> String;
}

/// A request that a worker is running.
pub struct Running {
    slot: Arc<Slot>,
    started: Instant,
    request: Arc<dyn Describe>,
    /// Its nesting depth on the thread (see `Slot`).
    depth: usize,
}

impl Running {
    /// A worker's own request (depth 0) or one nested in a callback (see `Slot::enter_nested`).
    pub fn new(slot: Arc<Slot>, request: Arc<dyn Describe>, depth: usize) -> Running {
        Running { slot, started: Instant::now(), request, depth }
    }


    /// One line for the logs: id, caller, what, how long, and the thread's CPU time.
    fn describe(&self, id: u64) -> String {
        let from = self.request.caller().map_or_else(String::new, |p| format!(" from {}", protocol::describe_pid(p)));
        let cpu = thread_cpu_ms(self.slot.tid).map_or_else(|| "?".to_string(), |ms| ms.to_string());
        format!(
            "request {id}{from}: {} (running {} ms, thread {} CPU {cpu} ms)",
            self.request.what(),
            self.started.elapsed().as_millis(),
            self.slot.tid
        )
    }
}

/// Who is queued, running, cancelled and written off; shared by the pool and the canceller.
#[derive(Default)]
pub struct Tracking {
    pub queued: HashSet<u64>,
    /// Cancelled while queued: the worker that dequeues them skips them.
    pub cancelled: HashSet<u64>,
    pub running: HashMap<u64, Running>,
    /// Running requests that ignored their cancellation: their workers are written off
    /// (they no longer count against `max_workers`) until the code returns, if ever.
    pub abandoned: HashSet<u64>,
    /// Jobs queued or running per owner.
    pub inflight: HashMap<Owner, usize>,
    /// Owners reported dead while jobs of theirs were still queued or running: their
    /// namespace is freed when the last one is done (freeing it earlier let a running job
    /// recreate it, and it leaked). Their jobs that have not started are skipped.
    pub dead: HashSet<Owner>,
}

impl Tracking {
    /// One job of `owner` is done (run or skipped). Returns true when the owner is dead and
    /// this was its last job: its namespace can go now.
    pub fn job_done(&mut self, owner: &Owner) -> bool {
        let Some(n) = self.inflight.get_mut(owner) else { return false };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.inflight.remove(owner);
        self.dead.remove(owner)
    }

    /// Whether request `id` is still running on the worker `slot`.
    fn runs_on(&self, id: u64, slot: &Arc<Slot>) -> bool {
        self.depth_on(id, slot).is_some()
    }

    /// Whether a request that runs on `slot` has been written off.
    fn abandoned_on(&self, slot: &Arc<Slot>) -> bool {
        self.abandoned.iter().any(|id| self.running.get(id).is_some_and(|r| Arc::ptr_eq(&r.slot, slot)))
    }

    /// Request `id`, which ran on `slot`, has ended: it leaves the record. Returns whether
    /// the thread stops counting as written off (it was, for this request, and no other
    /// request on it still is).
    pub fn finished(&mut self, id: u64, slot: &Arc<Slot>) -> bool {
        self.running.remove(&id);
        self.cancelled.remove(&id);
        self.abandoned.remove(&id) && !self.abandoned_on(slot)
    }

    /// The nesting depth of request `id` if it runs on `slot`.
    fn depth_on(&self, id: u64, slot: &Arc<Slot>) -> Option<usize> {
        self.running.get(&id).filter(|r| Arc::ptr_eq(&r.slot, slot)).map(|r| r.depth)
    }

    /// A line per running request, oldest first.
    fn report(&self, only: impl Fn(u64) -> bool) -> Vec<String> {
        let mut running: Vec<(&u64, &Running)> = self.running.iter().filter(|(id, _)| only(**id)).collect();
        running.sort_by_key(|(_, r)| r.started);
        running.into_iter().map(|(id, r)| r.describe(*id)).collect()
    }
}

/// Threads written off and still stuck, in every pool of the process and the event loop.
static WRITTEN_OFF: AtomicUsize = AtomicUsize::new(0);

/// A thread is written off (stuck in code that ignores cancellation); returns how many are
/// now. Every pool's write-offs and the event loop's count toward the one limit
/// (`max_abandoned_workers`): each holds a stuck thread.
pub fn count_write_off() -> usize {
    WRITTEN_OFF.fetch_add(1, Ordering::AcqRel) + 1
}

/// A written-off request returned (or was dropped): its thread is no longer stuck.
pub fn written_off_returned() {
    WRITTEN_OFF.fetch_sub(1, Ordering::AcqRel);
}

/// Describes what some part of the port runs, a line per request, for the logs of a fatal exit.
pub type Reporter = Box<dyn Fn() -> Vec<String> + Send + Sync>;

static REPORTERS: Mutex<Vec<Reporter>> = Mutex::new(Vec::new());

/// Adds a part of the port (a pool, the event loop) to the report of a fatal exit.
pub fn add_reporter(r: Reporter) {
    REPORTERS.lock().push(r);
}

/// A line per request running anywhere in the port. A reporter only takes its own short
/// locks, never the GIL.
pub fn running_everywhere() -> Vec<String> {
    REPORTERS.lock().iter().flat_map(|r| r()).collect()
}

/// Logs `msg` and one line per request, then has the writer exit with `code`. If the writer
/// cannot (blocked on a pipe nobody reads), exits here a little later.
pub fn exit_with_report(out: &Outbox, code: i32, msg: &str, report: Vec<String>) -> ! {
    out.log("error", "pyport", msg.as_bytes());
    for line in report {
        out.log("error", "pyport", line.as_bytes());
    }
    out.exit(code);
    thread::sleep(Duration::from_secs(2));
    crate::shutdown::exit_now(code)
}

#[derive(Clone, Copy, Debug)]
pub struct CancelConfig {
    pub abandon_after: Duration,
    pub max_abandoned: usize,
    /// `None`: the watchdog is off.
    pub gil_watchdog: Option<Duration>,
}

pub struct Canceller {
    pub tracking: Mutex<Tracking>,
    /// Cancellations handed to the raiser and not delivered yet: when each was asked for,
    /// and the worker it targets.
    undelivered: Mutex<HashMap<u64, (Instant, Arc<Slot>)>>,
    cfg: CancelConfig,
    out: Outbox,
    requests: Sender<u64>,
}

impl Canceller {
    /// Starts the canceller and the raiser. `on_write_off(worker)` runs (on the canceller
    /// thread) after a worker is written off, so that the pool can start a spare in its place
    /// and move the processes homed there.
    pub fn start(
        cfg: CancelConfig,
        out: Outbox,
        on_write_off: impl Fn(usize) + Send + 'static,
    ) -> std::io::Result<Arc<Canceller>> {
        let (requests, requests_rx) = unbounded();
        let (raise_tx, raise_rx) = unbounded();
        let c = Arc::new(Canceller {
            tracking: Mutex::new(Tracking::default()),
            undelivered: Mutex::new(HashMap::new()),
            cfg,
            out,
            requests,
        });
        let me = Arc::downgrade(&c);
        add_reporter(Box::new(move || me.upgrade().map_or_else(Vec::new, |c| c.tracking.lock().report(|_| true))));
        let me = c.clone();
        thread::Builder::new()
            .name("pyport-cancel".into())
            .spawn(move || me.cancel_loop(requests_rx, raise_tx, on_write_off))?;
        let me = c.clone();
        thread::Builder::new().name("pyport-raiser".into()).spawn(move || me.raise_loop(raise_rx))?;
        Ok(c)
    }

    /// Asks for request `id` to be cancelled; returns at once.
    pub fn cancel(&self, id: u64) {
        // The canceller lives as long as the process.
        let _ = self.requests.send(id);
    }

    /// Workers written off: threads still running a request that ignored its cancellation
    /// (a thread counts once, however many of its nested requests did).
    pub fn abandoned(&self) -> usize {
        let t = self.tracking.lock();
        let mut slots: Vec<*const Slot> =
            t.abandoned.iter().filter_map(|id| t.running.get(id)).map(|r| Arc::as_ptr(&r.slot)).collect();
        slots.sort_unstable();
        slots.dedup();
        slots.len()
    }

    fn cancel_loop(&self, requests: Receiver<u64>, raiser: Sender<(u64, Arc<Slot>)>, on_write_off: impl Fn(usize)) {
        // Workers to write off if their request still runs at the deadline.
        let mut watch: Vec<(u64, Arc<Slot>, Instant)> = Vec::new();
        loop {
            let received = match self.next_deadline(&watch) {
                None => requests.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(deadline) => requests.recv_deadline(deadline),
            };
            match received {
                Ok(id) => {
                    if let Some(slot) = self.cancel_queued_or_find(id) {
                        self.undelivered.lock().insert(id, (Instant::now(), slot.clone()));
                        let _ = raiser.send((id, slot.clone()));
                        watch.push((id, slot, Instant::now() + self.cfg.abandon_after));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.check_watchdog();
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = watch.drain(..).partition(|w| w.2 <= now);
            watch = later;
            for (id, slot, _) in due {
                if self.write_off_if_still_running(id, &slot) {
                    on_write_off(slot.worker);
                }
            }
        }
    }

    fn next_deadline(&self, watch: &[(u64, Arc<Slot>, Instant)]) -> Option<Instant> {
        let write_off = watch.iter().map(|w| w.2).min();
        let watchdog = self.cfg.gil_watchdog.and_then(|limit| {
            let oldest = self.undelivered.lock().values().map(|(asked, _)| *asked).min()?;
            Some(oldest + limit)
        });
        match (write_off, watchdog) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Cancels a queued request (its worker will skip it), or returns the worker running it.
    fn cancel_queued_or_find(&self, id: u64) -> Option<Arc<Slot>> {
        let mut t = self.tracking.lock();
        if t.queued.remove(&id) {
            t.cancelled.insert(id);
            return None;
        }
        t.running.get(&id).map(|r| r.slot.clone()) // None: already answered
    }

    fn raise_loop(&self, requests: Receiver<(u64, Arc<Slot>)>) {
        for (id, slot) in requests.iter() {
            Python::attach(|py| {
                // Fetched before taking the lock: the first fetch creates the type, which can
                // run Python code and let another thread take the GIL, and that thread may be
                // a worker waiting for this very lock.
                let exc = py.get_type::<CallCancelled>();
                let t = self.tracking.lock();
                if let Some(depth) = t.depth_on(id, &slot) {
                    // SAFETY: GIL held; the type object stays alive for the call.
                    unsafe {
                        ffi::PyThreadState_SetAsyncExc(slot.ident as _, exc.as_ptr());
                    }
                    slot.cancelled.fetch_min(depth, Ordering::AcqRel);
                }
            });
            self.undelivered.lock().remove(&id);
        }
    }

    /// Fires when a cancellation is still undelivered after `gil_watchdog` while its request
    /// still runs. One whose request has finished meanwhile is moot and forgotten.
    fn check_watchdog(&self) {
        let Some(limit) = self.cfg.gil_watchdog else { return };
        let now = Instant::now();
        let overdue: Vec<(u64, Arc<Slot>)> = {
            let undelivered = self.undelivered.lock();
            undelivered
                .iter()
                .filter(|(_, (asked, _))| now.duration_since(*asked) >= limit)
                .map(|(id, (_, slot))| (*id, slot.clone()))
                .collect()
        };
        if overdue.is_empty() {
            return;
        }
        let t = self.tracking.lock();
        let Some((id, _)) = overdue.iter().find(|(id, slot)| t.runs_on(*id, slot)) else {
            drop(t);
            let mut undelivered = self.undelivered.lock();
            for (id, _) in overdue {
                undelivered.remove(&id);
            }
            return;
        };
        drop(t);
        let msg = format!(
            "GIL watchdog: the cancellation of request {id} could not get the GIL for {} ms; \
             something holds it and ignores cancellation (C code, e.g. a long builtin loop or a \
             catastrophic regular expression). Restarting the port. Running requests (the \
             culprit's thread is the one with the most CPU time):",
            limit.as_millis()
        );
        exit_with_report(&self.out, EXIT_GIL_WATCHDOG, &msg, running_everywhere());
    }

    /// Writes off the worker of a cancelled request that still runs. Returns true if it did.
    fn write_off_if_still_running(&self, id: u64, slot: &Arc<Slot>) -> bool {
        let mut t = self.tracking.lock();
        if !t.runs_on(id, slot) {
            return false;
        }
        if t.abandoned_on(slot) {
            // The thread is written off already, for the request this one is nested in or
            // one nested in it: one stuck thread, one write-off.
            t.abandoned.insert(id);
            return false;
        }
        let abandoned = if t.abandoned.insert(id) { count_write_off() } else { WRITTEN_OFF.load(Ordering::Acquire) };
        let this = t.running.get(&id).map(|r| r.describe(id)).unwrap_or_default();
        if abandoned > self.cfg.max_abandoned {
            let report = t.report(|rid| t.abandoned.contains(&rid));
            drop(t);
            let msg = format!(
                "{abandoned} workers are stuck in code that ignores cancellation (limit {}): \
                 restarting the port. The stuck requests:",
                self.cfg.max_abandoned
            );
            exit_with_report(&self.out, EXIT_STUCK_WORKERS, &msg, report);
        }
        drop(t);
        let msg = format!(
            "{this} ignored its cancellation for {} ms (blocked in C code?); its worker is \
             written off and a spare serves instead ({abandoned} written off, limit {})",
            self.cfg.abandon_after.as_millis(),
            self.cfg.max_abandoned
        );
        self.out.log("warning", "pyport", msg.as_bytes());
        true
    }

}

/// User plus system CPU time of thread `tid` of this process, in milliseconds.
pub fn thread_cpu_ms(tid: libc::pid_t) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // "tid (comm) state ppid ... utime stime ...": comm may hold spaces and parentheses.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: plain configuration query.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as u64 } else { 100 };
    Some((utime + stime) * 1000 / ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_time_of_a_busy_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let busy = thread::spawn(move || {
            // SAFETY: plain query.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let start = Instant::now();
            let mut x = 0u64;
            while start.elapsed() < Duration::from_millis(300) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            thread::sleep(Duration::from_millis(200));
            x
        });
        let tid = rx.recv().unwrap();
        thread::sleep(Duration::from_millis(350));
        let cpu = thread_cpu_ms(tid).expect("the thread's stat is readable");
        // It spun for 300 ms of wall time; on a loaded machine it may have had less CPU,
        // but never none, and never more than the time that has passed.
        assert!(cpu > 0 && cpu <= 2000, "cpu {cpu} ms");
        busy.join().unwrap();
        assert_eq!(thread_cpu_ms(tid), None, "a finished thread has no stat");
    }
}
