//! `async def`: a `call` or `eval` whose result is a coroutine is awaited on one asyncio event
//! loop, and the caller gets the coroutine's result (or its exception) as the reply.
//!
//! * **One loop, several threads.** The loop runs on whichever of its threads holds the
//!   baton (see `baton`), started on first use and attached to Python for life, like
//!   workers. Many coroutines share the loop, so their number is not bounded by
//!   `--max-workers`: the worker that got the coroutine queues it here and is free at once.
//!   A thread that must wait outside Python in the middle of a coroutine (`erlang.call`)
//!   hands the loop to another thread meanwhile (see [`begin_wait`]), so a callback into
//!   Erlang never stops the other coroutines.
//! * **An inbox** (a Rust queue) carries what the loop must do: start a task, cancel one,
//!   drop one. The worker and the reader thread push to it without running any Python code
//!   and wake the loop by writing a byte to a pipe that the loop watches.
//! * **Replies** are built on the loop's thread, under the GIL, by the task's done-callback,
//!   with the same code and shapes as a synchronous call (`exec::finish`), and only queued.
//! * **Cancellation** (`{cancel, Id}`: the caller timed out or died) cancels the task, so
//!   `CancelledError` is raised at its `await` and its `finally` blocks run; its reply is
//!   then `cancelled`. A cancel that arrives while the worker still runs the call that will
//!   return the coroutine is kept (`early`) and applied at the hand-off.
//! * **The watcher** (see `watch`) holds the loop to the rules of workers: a cancellation the
//!   loop cannot take because something holds the GIL fires the GIL watchdog; a loop stuck
//!   in one callback while work waits for it has its thread written off and another thread
//!   takes over; a task that ignores its cancellation is dropped after a grace period.
//!
//! Lock order: `inbox`, then the pool's tracking lock (through the `in_pool` test of
//! [`Aio::cancel`]); `tasks` and the baton's lock are never held with another lock. None is
//! ever held while waiting for the GIL.

mod baton;
mod driver;
mod watch;

use crate::cancel::{CancelConfig, Describe};
use crate::exec::Frame;
use crate::framing::Outbox;
use crate::protocol::{self, atom};
use eetf::Term;
use parking_lot::Mutex;
use pyo3::prelude::*;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::Instant;

pub use driver::{begin_wait, LoopWait};

/// What the loop is asked to do.
enum Message {
    /// Run `coro` as a task and answer request `id` when it is done; `cancelled`: its cancel
    /// arrived before the hand-off.
    Start { id: u64, coro: Py<PyAny>, cancelled: bool },
    /// The caller of request `id` gave up.
    Cancel(u64),
    /// Task `id` ignored its cancellation for the grace period: stop waiting for it.
    Drop(u64),
}

#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
    /// When the oldest message not yet taken by the loop was queued.
    pending_since: Option<Instant>,
    /// Requests handed to the loop and not answered yet.
    live: HashSet<u64>,
    /// Cancels that arrived while the pool still held their request (not handed over yet).
    early: HashSet<u64>,
    /// Why the loop cannot run, once it failed: every hand-off is answered with this.
    broken: Option<Term>,
}

impl Inbox {
    /// Admits request `id` for a hand-off: Ok(whether it was cancelled before it came), or
    /// the reason to answer it with when the loop cannot run.
    fn admit(&mut self, id: u64) -> Result<bool, Term> {
        if let Some(reason) = &self.broken {
            return Err(reason.clone());
        }
        self.live.insert(id);
        Ok(self.early.remove(&id))
    }

    fn push(&mut self, m: Message) {
        self.messages.push(m);
        self.pending_since.get_or_insert_with(Instant::now);
    }

    /// Records the cancel of request `id`; returns true when it was queued for the loop (a
    /// live task), which must then be woken. See [`Aio::cancel`].
    fn cancel(&mut self, id: u64, in_pool: impl Fn(u64) -> bool) -> bool {
        if self.live.contains(&id) {
            self.push(Message::Cancel(id));
            return true;
        }
        if in_pool(id) {
            // Cancels of requests that finished without a coroutine are dropped here, so the
            // set holds at most the requests in the pool.
            self.early.retain(|e| in_pool(*e));
            self.early.insert(id);
        }
        false
    }

    /// Everything queued for the loop.
    fn take(&mut self) -> Vec<Message> {
        self.pending_since = None;
        std::mem::take(&mut self.messages)
    }

    /// Request `id` was answered; returns whether it was live.
    fn answered(&mut self, id: u64) -> bool {
        self.live.remove(&id)
    }
}

/// A request handed to the loop, from the hand-off until it is answered.
struct TaskEntry {
    /// The asyncio task, once the loop has made it.
    task: Option<Py<PyAny>>,
    request: Arc<dyn Describe>,
    since: Instant,
    /// When its caller gave up (the cancel reached the port).
    cancel_asked: Option<Instant>,
    /// When the loop cancelled the task.
    cancel_delivered: Option<Instant>,
    /// Asked to drop it (it ignored its cancellation).
    drop_asked: bool,
    /// Set while its step waits outside the loop (a callback into Erlang); storing true
    /// ends that wait.
    waiting: Option<Arc<AtomicBool>>,
}

#[derive(Default)]
struct Tasks {
    by_id: HashMap<u64, TaskEntry>,
    /// The asyncio task object's address → its request id.
    by_task: HashMap<usize, u64>,
}

/// What the thread that holds the baton is doing, for the watcher (no GIL needed).
#[derive(Default)]
struct Progress {
    /// Bumped at every callback the loop starts.
    seq: AtomicU64,
    /// When the current callback started (ns since `Aio::epoch`), 0 between callbacks.
    since: AtomicU64,
    /// Since when other work waits for the loop behind the current callback (callbacks
    /// ready, a timer due), in the same ns; 0: none known.
    waiting_since: AtomicU64,
    /// The baton token of the thread that runs the loop, 0 while none does (a hand-over).
    token: AtomicU64,
    /// The driver's ids: CPython's (the target of a raise) and the kernel's (CPU time).
    ident: AtomicU64,
    tid: AtomicU64,
}

pub struct Aio {
    out: Outbox,
    cfg: CancelConfig,
    inbox: Mutex<Inbox>,
    tasks: Mutex<Tasks>,
    /// Requests handed over and not answered yet (`async_tasks` in stats).
    running: AtomicUsize,
    /// The loop watches `wake_rx`; a byte written to `wake_tx` makes it read the inbox.
    wake_rx: OwnedFd,
    wake_tx: OwnedFd,
    started: Once,
    baton: baton::Baton,
    progress: Progress,
    /// The loop and the driver module, made by the first driver thread.
    event_loop: OnceLock<Py<PyAny>>,
    module: OnceLock<Py<PyModule>>,
    watch: watch::Watch,
    epoch: Instant,
    /// `epoch` as CLOCK_MONOTONIC ns, the clock of asyncio's `loop.time()`.
    epoch_monotonic_ns: u64,
    /// The pool whose requests nested in the loop's callbacks run on its threads (see
    /// `driver`), once the pool exists.
    pool_id: OnceLock<usize>,
}

impl Aio {
    /// Creates the inbox and the wake-up pipe; the loop's first thread starts on the first
    /// hand-off. `cfg`: the cancellation rules of workers, which the loop follows too.
    pub fn new(out: Outbox, cfg: CancelConfig) -> std::io::Result<Arc<Aio>> {
        let (wake_rx, wake_tx) = nonblocking_pipe()?;
        let aio = Arc::new(Aio {
            out,
            cfg,
            inbox: Mutex::new(Inbox::default()),
            tasks: Mutex::new(Tasks::default()),
            running: AtomicUsize::new(0),
            wake_rx,
            wake_tx,
            started: Once::new(),
            baton: baton::Baton::default(),
            progress: Progress::default(),
            event_loop: OnceLock::new(),
            module: OnceLock::new(),
            watch: watch::Watch::default(),
            epoch: Instant::now(),
            epoch_monotonic_ns: monotonic_ns(),
            pool_id: OnceLock::new(),
        });
        let me = Arc::downgrade(&aio);
        crate::cancel::add_reporter(Box::new(move || me.upgrade().map_or_else(Vec::new, |a| a.report())));
        Ok(aio)
    }

    /// The pool that runs requests: those nested in a coroutine's callback run on the loop's
    /// thread that waits for it, watched by that pool's canceller (set once, at start-up).
    pub fn set_pool(&self, pool_id: usize) {
        let _ = self.pool_id.set(pool_id);
    }

    /// Requests handed over to the loop and not answered yet.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Loop threads written off and still stuck (they count toward `max_abandoned_workers`).
    pub fn written_off(&self) -> usize {
        self.baton.written_off()
    }

    /// Hands the coroutine that request `id` returned to the loop. Called by a worker while the
    /// pool still counts the request as running. Returns the reply to send now if the loop
    /// cannot take it (it failed to start), else None: the loop answers when the task is done.
    pub fn hand_off(self: &Arc<Self>, py: Python<'_>, id: u64, coro: Py<PyAny>, request: Arc<dyn Describe>) -> Option<Frame> {
        self.start_loop_once();
        // Entered first: the loop may take the task as soon as it is queued.
        let entry = TaskEntry {
            task: None,
            request,
            since: Instant::now(),
            cancel_asked: None,
            cancel_delivered: None,
            drop_asked: false,
            waiting: None,
        };
        self.tasks.lock().by_id.insert(id, entry);
        let mut inbox = self.inbox.lock();
        let cancelled = match inbox.admit(id) {
            Ok(cancelled) => cancelled,
            Err(reason) => {
                drop(inbox);
                self.tasks.lock().by_id.remove(&id);
                // Never awaited: closing it spares a "coroutine was never awaited" warning.
                let _ = coro.bind(py).call_method0("close");
                return Some(protocol::error_frame(Some(id), reason));
            }
        };
        inbox.push(Message::Start { id, coro, cancelled });
        self.running.fetch_add(1, Ordering::AcqRel);
        drop(inbox);
        if cancelled {
            if let Some(e) = self.tasks.lock().by_id.get_mut(&id) {
                e.cancel_asked = Some(Instant::now());
            }
        }
        self.wake();
        self.watch.changed();
        None
    }

    /// `{cancel, Id}`, from the reader thread: never waits for the GIL. `in_pool(id)` tells
    /// whether the pool still holds request `id` (queued or running): such a request may yet
    /// return a coroutine, so its cancel is kept until it is handed over or done.
    pub fn cancel(self: &Arc<Self>, id: u64, in_pool: impl Fn(u64) -> bool) {
        let queued = self.inbox.lock().cancel(id, in_pool);
        if !queued {
            return;
        }
        if let Some(e) = self.tasks.lock().by_id.get_mut(&id) {
            e.cancel_asked.get_or_insert_with(Instant::now);
            // A step waiting for Erlang ends its wait now, whoever runs the loop.
            if let Some(w) = &e.waiting {
                w.store(true, Ordering::Release);
            }
        }
        self.wake();
        // Whether the GIL can be had at all is the watchdog's question (see `watch`).
        self.watch.probe_gil();
        self.watch.changed();
    }

    fn wake(&self) {
        // A full pipe already holds a wake-up, so a failed write loses nothing.
        // SAFETY: writes one byte from a valid buffer to a descriptor this struct owns.
        unsafe {
            libc::write(self.wake_tx.as_raw_fd(), [1u8].as_ptr().cast(), 1);
        }
    }

    /// Empties the wake-up pipe (non-blocking reads until it would block).
    fn clear_wake(&self) {
        let mut buf = [0u8; 256];
        // SAFETY: reads into a valid buffer of that size from a descriptor this struct owns.
        while unsafe { libc::read(self.wake_rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    fn start_loop_once(self: &Arc<Self>) {
        self.started.call_once(|| {
            let first = self.baton.first();
            crate::threads::reserve_always();
            if let Err(e) = self.spawn_driver(first) {
                crate::threads::release();
                let msg = format!("cannot start the asyncio event loop thread: {e}");
                self.inbox.lock().broken = Some(internal_error(&msg));
            }
            if let Err(e) = watch::start(self.clone()) {
                let msg = format!("cannot start the asyncio watcher: {e}; async calls are not watched");
                self.out.log("error", "pyport", msg.as_bytes());
            }
        });
    }

    /// Queues the reply of request `id` (only queues: the caller is attached to Python) and
    /// forgets the request. A request answered already (written off, dropped) is not
    /// answered twice.
    fn answer(&self, id: u64, frame: Frame) {
        if !self.forget(id) {
            return;
        }
        self.out.send(frame);
    }

    /// Forgets request `id`; false if it was forgotten already.
    fn forget(&self, id: u64) -> bool {
        if !self.inbox.lock().answered(id) {
            return false;
        }
        let entry = self.tasks.lock().by_id.remove(&id);
        if let Some(task) = entry.as_ref().and_then(|e| e.task.as_ref()) {
            self.tasks.lock().by_task.remove(&(task.as_ptr() as usize));
        }
        self.running.fetch_sub(1, Ordering::AcqRel);
        self.watch.changed();
        true
    }

    /// The loop cannot run: answers every queued and running request with `reason`, and
    /// every later hand-off too.
    fn fail_all(&self, py: Python<'_>, reason: Term) {
        let messages = {
            let mut inbox = self.inbox.lock();
            inbox.broken = Some(reason.clone());
            inbox.take()
        };
        for m in messages {
            if let Message::Start { coro, .. } = m {
                let _ = coro.bind(py).call_method0("close");
            }
        }
        let live: Vec<u64> = self.inbox.lock().live.iter().copied().collect();
        for id in live {
            self.answer(id, protocol::error_frame(Some(id), reason.clone()));
        }
    }

    /// A line per request on the loop, oldest first, for the logs of a fatal exit.
    fn report(&self) -> Vec<String> {
        let tasks = self.tasks.lock();
        let mut entries: Vec<(&u64, &TaskEntry)> = tasks.by_id.iter().collect();
        entries.sort_by_key(|(_, e)| e.since);
        let mut lines: Vec<String> = entries.into_iter().map(|(id, e)| describe_task(*id, e)).collect();
        let tid = self.progress.tid.load(Ordering::Acquire) as libc::pid_t;
        if tid > 0 && self.progress.since.load(Ordering::Acquire) != 0 {
            let cpu = crate::cancel::thread_cpu_ms(tid).map_or_else(|| "?".to_string(), |ms| ms.to_string());
            lines.push(format!("the event loop runs a callback on thread {tid} (CPU {cpu} ms)"));
        }
        lines
    }

    /// What request `id` runs, for a log line.
    fn what(&self, id: u64) -> String {
        self.tasks.lock().by_id.get(&id).map_or_else(|| format!("async request {id}"), |e| describe_task(id, e))
    }

    fn nanos(&self) -> u64 {
        // Never 0: 0 means "no callback runs".
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.epoch + std::time::Duration::from_nanos(nanos.saturating_sub(1))
    }

    /// A `loop.time()` value (CLOCK_MONOTONIC seconds) in the ns of [`Aio::nanos`].
    fn loop_time_nanos(&self, seconds: f64) -> u64 {
        ((seconds * 1e9) as u64).saturating_sub(self.epoch_monotonic_ns) + 1
    }
}

/// CLOCK_MONOTONIC now, in ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `async request 12 from <0.90.0>: call m.f (running 1200 ms, cancelled 1000 ms ago)`.
fn describe_task(id: u64, e: &TaskEntry) -> String {
    let from = e.request.caller().map_or_else(String::new, |p| format!(" from {}", protocol::describe_pid(p)));
    let mut state = format!("running {} ms", e.since.elapsed().as_millis());
    if let Some(asked) = e.cancel_asked {
        state.push_str(&format!(", cancelled {} ms ago", asked.elapsed().as_millis()));
    }
    if e.waiting.is_some() {
        state.push_str(", waiting for Erlang");
    }
    format!("async request {id}{from}: {} ({state})", e.request.what())
}

fn internal_error(msg: &str) -> Term {
    protocol::tuple(vec![atom("internal_error"), protocol::binary(msg.as_bytes())])
}

/// A pipe whose both ends are non-blocking and closed on exec.
fn nonblocking_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(inbox: &mut Inbox, id: u64) -> bool {
        match inbox.admit(id) {
            Ok(cancelled) => cancelled,
            Err(_) => panic!("the loop is not broken here"),
        }
    }

    #[test]
    fn a_cancel_before_the_hand_off_cancels_the_task_at_once() {
        let mut inbox = Inbox::default();
        // The request is still in the pool (its call runs): kept, no message yet.
        assert!(!inbox.cancel(7, |id| id == 7));
        assert!(inbox.messages.is_empty());
        assert!(admitted(&mut inbox, 7), "the hand-off must see the early cancel");
        assert!(inbox.early.is_empty());
    }

    #[test]
    fn a_cancel_after_the_hand_off_goes_to_the_loop() {
        let mut inbox = Inbox::default();
        assert!(!admitted(&mut inbox, 8));
        assert!(inbox.cancel(8, |_| false));
        assert!(matches!(inbox.messages.as_slice(), [Message::Cancel(8)]));
        // Answered: a late cancel is dropped.
        assert!(inbox.answered(8));
        inbox.messages.clear();
        assert!(!inbox.cancel(8, |_| false));
        assert!(inbox.messages.is_empty() && inbox.early.is_empty());
    }

    #[test]
    fn cancels_of_requests_that_left_the_pool_are_not_kept() {
        let mut inbox = Inbox::default();
        // Not in the pool and not live: a finished synchronous call.
        assert!(!inbox.cancel(1, |_| false));
        assert!(inbox.early.is_empty());
        // Kept while in the pool, dropped by the next cancel once it has left it.
        assert!(!inbox.cancel(2, |id| id == 2));
        assert!(!inbox.cancel(3, |id| id == 3));
        assert_eq!(inbox.early.iter().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn a_broken_loop_answers_every_hand_off() {
        let mut inbox = Inbox { broken: Some(internal_error("no loop")), ..Inbox::default() };
        assert!(inbox.admit(9).is_err());
        assert!(inbox.live.is_empty());
    }

    /// The watcher measures how long the loop has left work waiting from the first message
    /// not taken: later messages do not move that time, taking them clears it.
    #[test]
    fn pending_since_is_the_oldest_message_not_taken() {
        let mut inbox = Inbox::default();
        assert!(inbox.pending_since.is_none());
        assert!(!admitted(&mut inbox, 1));
        inbox.push(Message::Cancel(1));
        let first = inbox.pending_since.expect("set by the first message");
        std::thread::sleep(std::time::Duration::from_millis(2));
        inbox.push(Message::Drop(1));
        assert_eq!(inbox.pending_since, Some(first));
        assert_eq!(inbox.take().len(), 2);
        assert!(inbox.pending_since.is_none());
    }
}
