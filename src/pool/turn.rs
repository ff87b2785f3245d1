//! Who reads the input: the reader thread, or an idle worker that borrowed the turn.
//!
//! The main thread reads every frame and hands each request to a worker. On one CPU that
//! hand-off is a context switch more per request, about half of a bare pipe round trip
//! (`make bench-floor`). So where the port may use only one CPU, a worker reads for itself
//! while requests come one at a time: the reader that queues a request for a pool with
//! every worker idle lends the turn to read with it, and the worker, when the request ends,
//! reads the next frame, serves it as the main thread would, and runs a request lent to it
//! on the spot, then reads again.
//!
//! Reading must never wait behind Python: a cancellation, a heartbeat, `py:stats()`, a
//! callback's answer or a SharedDict read has to be read while a request holds the GIL. The
//! main thread therefore watches a request that holds the turn. It wakes every [`TICK`]
//! while requests run and, when the same request has been running since its previous look,
//! takes the turn back and reads again, as it does on more CPUs: a frame waits at most two
//! ticks. A thread about to wait for a frame (a callback's answer) hands the turn back at
//! once (see [`Turn::before_waiting`]). Lending and borrowing cost a few atomic operations
//! and, before a borrower answers a request it ran, one poll that does not wait; the price
//! is the main thread's looks, a wake-up every millisecond while requests come. When no request has run for
//! [`QUIET_TICKS`] ticks the main thread sleeps until the next one starts, so an idle port
//! wakes nobody.
//!
//! Concurrent callers get the main thread: once requests overlap (one is read while another
//! runs or waits, input comes while a lent request runs, requests of two processes come
//! within 2 ms, or a request ran past a look), nothing is lent for a while. A borrower still
//! reading hands reading back as soon as a request it reads is not lent to it (it is queued
//! for the pool instead), so a burst of callers or of blocking requests is spread over the
//! pool rather than read one request at a time, and under many callers frames are read and
//! answered in batches. A spare that borrowed does not retire while it reads.
//!
//! A borrower waits in `poll` on the input and on an eventfd, so that work queued for it by
//! another thread (a nested request that came after its callback's answer, a written-off
//! worker's queue) wakes it. It then hands the turn back and runs that work.

use crate::framing::{FrameReader, ReadError};
use parking_lot::{Condvar, Mutex};
use std::cell::Cell;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How often the main thread looks at a borrower that runs a request.
const TICK: Duration = Duration::from_millis(1);
/// Ticks without a request before the main thread stops looking until the next one.
const QUIET_TICKS: u32 = 50;
/// No lending for this long after a request ran past a look or called back into Erlang,
/// or after requests overlapped: under concurrent callers the main thread reads, as on more CPUs,
/// rather than each blocking request keeping the input unread until the next look.
const UNSETTLED_AFTER_TAKEOVER: Duration = Duration::from_millis(50);
const UNSETTLED_AFTER_OVERLAP: Duration = Duration::from_millis(10);
/// Requests of two processes this close together count as concurrent callers.
const OTHER_CALLER_WINDOW: Duration = Duration::from_millis(2);

// The turn's state is one word, `lease << 2 | kind`. The lease number changes whenever a
// borrower takes the turn or loses it, so that a borrower that was slow to notice it lost
// the turn cannot act on it any more: every change a borrower makes is a compare-and-swap
// that names its own lease.

/// The main thread reads.
const MAIN: u64 = 0;
/// A borrower reads (or waits for input).
const LENT: u64 = 1;
/// Nobody reads: a request runs whose worker will read when it ends.
const RUNNING: u64 = 2;

fn kind(state: u64) -> u64 {
    state & 3
}

fn with_kind(state: u64, kind: u64) -> u64 {
    state & !3 | kind
}

/// The same kind under the next lease.
fn next_lease(state: u64, kind: u64) -> u64 {
    (state & !3).wrapping_add(4) | kind
}

/// Whether idle workers may read the input themselves (`--worker-reads`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerReads {
    /// Only where the port may use a single CPU at a time (see `spin::single_cpu`).
    Auto,
    Always,
    Never,
}

impl WorkerReads {
    pub fn parse(s: &str) -> Option<WorkerReads> {
        match s {
            "auto" => Some(WorkerReads::Auto),
            "always" => Some(WorkerReads::Always),
            "never" => Some(WorkerReads::Never),
            _ => None,
        }
    }

    fn enabled(self) -> bool {
        match self {
            WorkerReads::Auto => crate::spin::single_cpu(),
            WorkerReads::Always => true,
            WorkerReads::Never => false,
        }
    }
}

thread_local! {
    /// The state word (lease and kind) this thread set when it borrowed the turn, or lent
    /// it for the request it read; None when it holds no turn.
    static HELD: Cell<Option<u64>> = const { Cell::new(None) };
}

/// What the reader does with what it read: routes a frame (its time of reading, if calls
/// are traced), or ends the process on a read error. The main thread's router.
pub type Route = Box<dyn Fn(Result<Vec<u8>, ReadError>) + Send + Sync>;

pub struct Turn {
    enabled: bool,
    state: AtomicU64,
    /// Bumped whenever a request starts that holds the turn: the watch compares it across a tick.
    runs: AtomicU64,
    input: Mutex<FrameReader<File>>,
    input_fd: RawFd,
    /// Written to wake a borrower waiting in `poll`.
    nudge_fd: RawFd,
    /// The main thread's sleep while the turn is lent.
    watch_lock: Mutex<()>,
    watch_cv: Condvar,
    /// The main thread sleeps without a deadline (no request for a while).
    dozing: AtomicBool,
    /// A hash of the process whose request was routed last, and when (see `request_of`).
    last_owner: AtomicU64,
    last_owner_at: AtomicU64,
    /// Requests a borrower read and ran itself, for `py:stats()`.
    read_by_workers: AtomicU64,
    /// No lending before this time (ns since `epoch`): requests overlapped lately.
    calm_from: AtomicU64,
    epoch: std::time::Instant,
}

impl Turn {
    pub fn new(input: File, max_frame: usize, mode: WorkerReads) -> std::io::Result<Turn> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let nudge_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if nudge_fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Turn {
            enabled: mode.enabled(),
            state: AtomicU64::new(MAIN),
            runs: AtomicU64::new(0),
            input_fd: input.as_raw_fd(),
            input: Mutex::new(FrameReader::new(input, max_frame)),
            nudge_fd,
            watch_lock: Mutex::new(()),
            watch_cv: Condvar::new(),
            dozing: AtomicBool::new(false),
            last_owner: AtomicU64::new(0),
            last_owner_at: AtomicU64::new(0),
            read_by_workers: AtomicU64::new(0),
            calm_from: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        })
    }

    /// The main thread reads the next frame, if the turn is its own.
    pub fn read_as_main(&self) -> Option<Result<Vec<u8>, ReadError>> {
        (kind(self.state.load(Ordering::Acquire)) == MAIN).then(|| self.input.lock().read_frame())
    }

    /// The reader (the main thread, or a borrower) is about to queue a request for an idle
    /// worker with nothing queued: that worker will read next, and until then nobody does.
    /// Called before the request is queued, so that it cannot end before the turn is lent.
    pub fn lend(&self) {
        let now = self.state.load(Ordering::Acquire);
        // A new lease for every lent request, so that the main thread's look tells two
        // requests apart by the state word alone.
        let lent = next_lease(now, RUNNING);
        let (MAIN | LENT) = kind(now) else { return };
        if kind(now) == LENT && HELD.with(Cell::get) != Some(now) {
            return;
        }
        self.runs.fetch_add(1, Ordering::AcqRel);
        if self.state.compare_exchange(now, lent, Ordering::SeqCst, Ordering::Acquire).is_err() {
            return;
        }
        if kind(now) == LENT {
            HELD.with(|h| h.set(Some(lent)));
        }
        if self.dozing.load(Ordering::SeqCst) {
            self.wake_main();
        }
    }

    /// The main thread, while the turn is lent: returns when the turn is its own again,
    /// taken back from a request that has run for a whole tick, or handed back.
    pub fn watch(&self) {
        let mut running_seen = None;
        let mut last_runs = self.runs.load(Ordering::Acquire);
        let mut quiet = 0;
        loop {
            let state = self.state.load(Ordering::Acquire);
            let runs = self.runs.load(Ordering::Acquire);
            match kind(state) {
                MAIN => return,
                RUNNING if running_seen == Some(state) => {
                    let back = next_lease(state, MAIN);
                    if self.state.compare_exchange(state, back, Ordering::SeqCst, Ordering::Acquire).is_ok() {
                        self.unsettle(UNSETTLED_AFTER_TAKEOVER);
                        return;
                    }
                }
                RUNNING => running_seen = Some(state),
                _ => running_seen = None,
            }
            quiet = if runs == last_runs { quiet + 1 } else { 0 };
            last_runs = runs;
            let mut g = self.watch_lock.lock();
            // Handed back between the look above and this lock: whoever hands it back
            // notifies only once it can take the lock, so this check cannot miss it.
            if kind(self.state.load(Ordering::SeqCst)) == MAIN {
                return;
            }
            if quiet < QUIET_TICKS || kind(state) == RUNNING {
                self.watch_cv.wait_for(&mut g, TICK);
                continue;
            }
            // Idle: sleep until a request starts or the turn comes back (see `lend`).
            self.dozing.store(true, Ordering::SeqCst);
            if kind(self.state.load(Ordering::SeqCst)) == LENT {
                self.watch_cv.wait(&mut g);
            }
            self.dozing.store(false, Ordering::SeqCst);
            quiet = 0;
        }
    }

    fn wake_main(&self) {
        let _g = self.watch_lock.lock();
        self.watch_cv.notify_one();
    }

    /// An idle worker: takes the turn if a request (its own, or one the main thread lent
    /// it for) left it for a worker. Any worker may: a spare that reads does not retire
    /// meanwhile (it retires only from waiting on its queues).
    pub fn try_borrow(&self) -> bool {
        HELD.with(|h| h.set(None));
        if !self.enabled {
            return false;
        }
        let now = self.state.load(Ordering::Acquire);
        if kind(now) != RUNNING {
            return false;
        }
        let mine = next_lease(now, LENT);
        let ok = self.state.compare_exchange(now, mine, Ordering::SeqCst, Ordering::Acquire).is_ok();
        if ok {
            HELD.with(|h| h.set(Some(mine)));
            // A nudge left from an earlier borrower's time would hand this turn back at once;
            // work queued before now is seen by the caller's look at the queues after this.
            let mut buf = [0u8; 8];
            // SAFETY: reads at most 8 bytes into `buf`; the fd is non-blocking.
            unsafe { libc::read(self.nudge_fd, buf.as_mut_ptr().cast(), 8) };
        }
        ok
    }

    /// A borrower: waits for input or a nudge; returns the next frame, or None when nudged
    /// (work is queued: the caller checks).
    pub fn read_as_borrower(&self) -> Option<Result<Vec<u8>, ReadError>> {
        let mut input = self.input.lock();
        if !input.has_buffered() {
            let mut fds = [
                libc::pollfd { fd: self.input_fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.nudge_fd, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 || fds[1].revents != 0 {
                let mut buf = [0u8; 8];
                // SAFETY: reads at most 8 bytes into `buf`; the fd is non-blocking.
                unsafe { libc::read(self.nudge_fd, buf.as_mut_ptr().cast(), 8) };
                return None;
            }
        }
        Some(input.read_frame())
    }

    /// Whether frames were read that are not yet routed.
    pub fn more_input(&self) -> bool {
        // Never waits: if the main thread took the turn back meanwhile, it holds the input
        // while it blocks reading, and those frames are its own.
        self.input.try_lock().is_some_and(|input| input.has_buffered())
    }

    /// Whether this borrower lent the turn for the request it just routed (it runs it now).
    pub fn lent_to_me(&self) -> bool {
        let now = self.state.load(Ordering::Acquire);
        kind(now) == RUNNING && HELD.with(Cell::get) == Some(now)
    }

    /// A borrower that ran the request it read, before it answers: input that came while it
    /// ran means another caller is waiting (the caller of this request waits for the
    /// answer), so requests overlap and the main thread should read for a while. A poll
    /// that does not wait; only on this path.
    pub fn before_answering(&self) {
        if !self.lent_to_me() {
            return;
        }
        let mut fd = libc::pollfd { fd: self.input_fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call; a zero timeout never waits.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) } > 0 || self.more_input();
        if ready {
            self.overlapped();
        }
    }

    /// A borrower runs the request it read.
    pub fn runs_what_it_read(&self) {
        self.read_by_workers.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests borrowers read and ran themselves.
    pub fn runs_read_by_workers(&self) -> u64 {
        self.read_by_workers.load(Ordering::Relaxed)
    }

    /// A borrower whose last frame left it nothing to run reads on; false if the main
    /// thread took the turn back meanwhile.
    pub fn keep_reading(&self) -> bool {
        let Some(held) = HELD.with(Cell::get) else { return false };
        let reading = with_kind(held, LENT);
        let ok = if held == reading {
            self.state.load(Ordering::Acquire) == reading
        } else {
            self.state.compare_exchange(held, reading, Ordering::SeqCst, Ordering::Acquire).is_ok()
        };
        HELD.with(|h| h.set(ok.then_some(reading)));
        ok
    }

    /// A borrower hands the turn back to the main thread (work is queued for it).
    pub fn give_back(&self) {
        if let Some(held) = HELD.with(|h| h.take()) {
            if self.state.compare_exchange(held, next_lease(held, MAIN), Ordering::SeqCst, Ordering::Acquire).is_ok() {
                self.wake_main();
            }
        }
    }

    /// A thread about to wait for a frame (a callback's answer) while nobody reads: reading
    /// goes back to the main thread now rather than at its next look.
    pub fn before_waiting(&self) {
        // A child forked from the port never reads, and must not touch a lock it may have
        // inherited held.
        if !self.enabled || crate::forks::in_forked_child() {
            return;
        }
        let now = self.state.load(Ordering::Acquire);
        if kind(now) == RUNNING
            && self.state.compare_exchange(now, next_lease(now, MAIN), Ordering::SeqCst, Ordering::Acquire).is_ok()
        {
            // Requests that call back would hand reading back on every call, each time
            // waking the main thread: for a while the main thread keeps reading instead.
            self.unsettle(UNSETTLED_AFTER_TAKEOVER);
            self.wake_main();
        }
    }

    /// Work was queued by a thread other than the one reading: a borrower waiting for
    /// input must see it.
    pub fn queued(&self) {
        if !self.enabled {
            return;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let now = self.state.load(Ordering::SeqCst);
        if kind(now) == LENT && HELD.with(Cell::get) != Some(now) && !crate::forks::in_forked_child() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from `one` to an eventfd.
            unsafe { libc::write(self.nudge_fd, (&one as *const u64).cast(), 8) };
        }
    }

    /// Whether idle workers may read at all (`--worker-reads`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the reader may lend the turn for the request it routes now: not while
    /// requests overlap (see [`Turn::overlapped`]).
    pub fn may_lend(&self) -> bool {
        self.enabled && self.nanos() >= self.calm_from.load(Ordering::Relaxed)
    }

    /// The reader routes a request of the process whose hash is `owner`. On one CPU the
    /// port rarely sees requests overlap even under many callers (the VM runs only while
    /// the port waits), so two processes' requests within [`OTHER_CALLER_WINDOW`] count as
    /// concurrent callers too.
    pub fn request_of(&self, owner: u64) {
        let now = self.nanos();
        let last = self.last_owner.swap(owner, Ordering::Relaxed);
        let last_at = self.last_owner_at.swap(now, Ordering::Relaxed);
        if last != owner && now.saturating_sub(last_at) < OTHER_CALLER_WINDOW.as_nanos() as u64 {
            self.overlapped();
        }
    }

    /// Requests overlapped (one was read while another ran): no lending for a while.
    pub fn overlapped(&self) {
        if self.enabled {
            self.unsettle(UNSETTLED_AFTER_OVERLAP);
        }
    }

    fn unsettle(&self, d: Duration) {
        let until = self.nanos().saturating_add(d.as_nanos() as u64);
        self.calm_from.fetch_max(until, Ordering::Relaxed);
    }

    fn nanos(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    use std::thread;

    /// A turn reading from a pipe; also returns the pipe's write end.
    fn turn() -> (Arc<Turn>, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just opened and are owned by the files from here.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        (Arc::new(Turn::new(r, 1 << 20, WorkerReads::Always).unwrap()), w)
    }

    fn kind_now(t: &Turn) -> u64 {
        kind(t.state.load(Ordering::SeqCst))
    }

    /// Runs `f` on a thread of its own (each thread has its own held lease).
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        thread::spawn(f).join().unwrap()
    }

    #[test]
    fn a_worker_borrows_only_a_lent_turn() {
        let (t, _w) = turn();
        assert!(!t.try_borrow());
        t.lend();
        assert_eq!(kind_now(&t), RUNNING);
        let t2 = t.clone();
        assert!(on_thread(move || t2.try_borrow()));
        assert_eq!(kind_now(&t), LENT);
        let t3 = t.clone();
        assert!(!on_thread(move || t3.try_borrow()), "a second borrower");
    }

    /// A borrower slow to notice that the main thread took the turn back cannot act on
    /// it any more, not even once the main thread has lent it again: its lease is gone.
    #[test]
    fn a_stale_borrower_cannot_act() {
        let (t, _w) = turn();
        t.lend();
        let (to_a, a_rx) = std::sync::mpsc::channel::<&'static str>();
        let (from_a, a_said) = std::sync::mpsc::channel::<bool>();
        let ta = t.clone();
        let a = thread::spawn(move || {
            assert!(ta.try_borrow());
            // Routes a request and lends the turn with it, then stalls.
            ta.lend();
            from_a.send(ta.lent_to_me()).unwrap();
            for step in a_rx {
                let ok = match step {
                    "lent_to_me" => ta.lent_to_me(),
                    "keep_reading" => ta.keep_reading(),
                    "give_back" => {
                        ta.give_back();
                        true
                    }
                    _ => unreachable!(),
                };
                from_a.send(ok).unwrap();
            }
        });
        assert!(a_said.recv().unwrap());
        // The same request runs across two looks: the main thread reads again.
        t.watch();
        assert_eq!(kind_now(&t), MAIN);
        // It routes another request and lends the turn with it: the state has the kind A
        // last saw, but not A's lease.
        t.lend();
        to_a.send("lent_to_me").unwrap();
        assert!(!a_said.recv().unwrap(), "a stale borrower would run the new request");
        to_a.send("give_back").unwrap();
        a_said.recv().unwrap();
        assert_eq!(kind_now(&t), RUNNING, "a stale give_back took the turn");
        to_a.send("keep_reading").unwrap();
        assert!(!a_said.recv().unwrap(), "a stale borrower could read on");
        assert_eq!(kind_now(&t), RUNNING);
        let tb = t.clone();
        assert!(on_thread(move || tb.try_borrow()));
        drop(to_a);
        a.join().unwrap();
    }

    #[test]
    fn a_thread_about_to_wait_hands_reading_back() {
        let (t, _w) = turn();
        t.lend();
        t.before_waiting();
        assert_eq!(kind_now(&t), MAIN);
        assert!(!t.try_borrow());
    }

    #[test]
    fn queued_work_wakes_a_borrower_waiting_for_input() {
        let (t, mut w) = turn();
        t.lend();
        let tb = t.clone();
        let borrower = thread::spawn(move || {
            assert!(tb.try_borrow());
            let first = tb.read_as_borrower().map(|r| r.unwrap());
            (first, tb.read_as_borrower().map(|r| r.unwrap()))
        });
        while kind_now(&t) != LENT {
            thread::yield_now();
        }
        // The borrower waits for input; work comes from elsewhere instead.
        t.queued();
        std::io::Write::write_all(&mut w, &[0, 0, 0, 2, 7, 8]).unwrap();
        let (first, second) = borrower.join().unwrap();
        assert_eq!(first, None);
        assert_eq!(second, Some(vec![7, 8]));
    }

    #[test]
    fn off_means_never_lent() {
        let mut fds = [0; 2];
        // SAFETY: as in `turn`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: as in `turn`.
        let (r, _w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let t = Turn::new(r, 1 << 20, WorkerReads::Never).unwrap();
        assert!(!t.may_lend());
        assert!(!t.try_borrow());
        assert_eq!(kind_now(&t), MAIN);
    }
}
