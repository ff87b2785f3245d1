//! The elastic pool of Python worker threads, and where each request runs.
//!
//! * Hot workers (`--workers`, default 1: on 2 cores one worker was fastest for GIL-bound
//!   calls) live for the life of the port.
//! * Every worker has a queue of its own besides the shared one. A process with a home thread
//!   (see `homes`) has each request put on its home's queue, so that objects bound to a
//!   thread (sqlite3 connections, thread-locals, C libraries' per-thread state) keep working
//!   across its calls; the other requests go to the shared queue, which every worker serves
//!   when its own queue is empty.
//! * When the shared queue is non-empty and no worker has been idle for `--spare-after-ms`,
//!   the manager thread starts a spare worker, up to `--max-workers`; a spare also starts when
//!   a process needs a home and every worker is busy. Spares exit after a while without work,
//!   unless they are home to a process. So a call that sleeps, blocks or loops never stalls
//!   every other caller.
//! * Each worker attaches to the interpreter once and keeps its thread state for life
//!   (thread-locals survive between calls); it detaches only while waiting for a job. It
//!   never blocks on a channel or a lock that another thread holds while waiting for the
//!   GIL: that deadlocked `threading.Thread.start()` in the prototype.
//! * A lone hot worker polls for its next job for a few microseconds before it sleeps, so
//!   that a sequential caller's next request finds it awake, but only when the port may run
//!   on more than one CPU at a time (see `spin`).
//! * Cancellation, write-offs of stuck workers and the GIL watchdog live in `cancel`; the
//!   pool reports to it which request runs where, and clears a cancellation that arrived
//!   too late before a worker's next request. The processes homed on a written-off worker
//!   move to another: their namespaces survive, objects bound to the old thread may not.

use crate::aio::Aio;
use crate::cancel::{CancelConfig, Canceller, Describe, Running, Slot};
use crate::exec::{Frame, Interp, Mode, Outcome};
use crate::framing::Outbox;
use crate::homes::{self, Affinity, Candidate, Choice, HomeTable};
use crate::protocol::{self, atom, binary, tuple, Owner};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Select, Sender};
use parking_lot::Mutex;
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

mod turn;
mod worker;

pub use turn::{Route, Turn, WorkerReads};
pub use worker::panic_message;

pub use crate::python::PYTHON_THREAD_STACK;

pub enum Job {
    Call { id: u64, owner: Owner, module: String, function: String, payload: Vec<u8> },
    Code { id: u64, owner: Owner, code: String, payload: Vec<u8>, mode: Mode },
    Startup { id: u64, sys_path: Vec<String>, code: String },
    /// Work of another module (reading a SharedDict value that needs Python), run like any
    /// request: cancellable, written off if stuck. It uses no namespace.
    Task { id: u64, what: String, run: Box<dyn Fn(Python<'_>) -> Frame + Send + Sync> },
}

impl Job {
    /// The process whose namespace the job uses (start-up code has none).
    fn owner(&self) -> Option<&Owner> {
        match self {
            Job::Call { owner, .. } | Job::Code { owner, .. } => Some(owner),
            Job::Startup { .. } | Job::Task { .. } => None,
        }
    }

    /// Whether the job runs in its process's namespace (and so creates it if need be).
    fn uses_namespace(&self) -> bool {
        match self {
            Job::Code { .. } => true,
            // A frame builtin (`py:call(builtins, eval, [Code])`) may use it too, but only
            // without the arguments that name a namespace, which are not decoded here; such
            // a call does not choose a home, the process's next namespace request does.
            Job::Call { module, .. } => module == "__main__",
            Job::Startup { .. } | Job::Task { .. } => false,
        }
    }

    pub fn id(&self) -> u64 {
        match self {
            Job::Call { id, .. } | Job::Code { id, .. } | Job::Startup { id, .. } | Job::Task { id, .. } => *id,
        }
    }

    pub fn run(&self, py: Python<'_>, interp: &Interp) -> Outcome {
        let frame = match self {
            Job::Call { id, owner, module, function, payload } => {
                return interp.run_call(py, *id, owner, module, function, payload)
            }
            Job::Code { id, owner, code, payload, mode } => {
                return interp.run_code(py, *id, owner, code, payload, *mode)
            }
            Job::Startup { id, sys_path, code } => interp.run_startup(py, *id, sys_path, code),
            Job::Task { run, .. } => run(py),
        };
        Outcome::Reply(frame)
    }
}

impl Describe for Job {
    fn caller(&self) -> Option<&Owner> {
        self.owner()
    }

    fn what(&self) -> String {
        match self {
            Job::Call { module, function, .. } => format!("call {}", clip(&format!("{module}.{function}"))),
            Job::Code { code, mode, .. } => {
                let verb = if *mode == Mode::Eval { "eval" } else { "exec" };
                let first = code.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
                format!("{verb} {}", clip(first))
            }
            Job::Startup { .. } => "start-up code".to_string(),
            Job::Task { what, .. } => what.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub hot: usize,
    pub max: usize,
    pub spare_after: Duration,
    pub spare_idle: Duration,
    pub affinity: Affinity,
    pub cancel: CancelConfig,
}

pub struct Pool {
    /// A number unique among the process's pools (see `Slot`).
    id: usize,
    /// The shared queue, for requests of processes without a home.
    jobs_tx: Sender<Arc<Job>>,
    jobs_rx: Receiver<Arc<Job>>,
    out: Outbox,
    interp: Arc<Interp>,
    cfg: PoolConfig,
    total: AtomicUsize,
    idle: AtomicUsize,
    canceller: Arc<Canceller>,
    kick_tx: Sender<()>,
    sched: Mutex<Sched>,
    /// Where coroutines go to be awaited; None in a pool whose jobs never make one (the
    /// SharedDict decoders).
    aio: Option<Arc<Aio>>,
    /// The turn to read the input, which idle hot workers may borrow (see `turn`); None in
    /// a pool that never reads (the SharedDict decoders).
    turn: Option<Arc<Turn>>,
    /// How a borrower routes what it read: the main thread's router, set once it exists.
    route: std::sync::OnceLock<Route>,
}

/// The live workers and the processes' homes. Lock order: `sched`, then the canceller's
/// tracking lock, never the other way round.
#[derive(Default)]
struct Sched {
    workers: BTreeMap<usize, Arc<Worker>>,
    homes: HomeTable,
    next_id: usize,
}

/// A worker thread as the scheduler sees it.
struct Worker {
    id: usize,
    hot: bool,
    /// Its own queue: requests of the processes homed on it.
    tx: Sender<Arc<Job>>,
    rx: Receiver<Arc<Job>>,
    /// Requests sent to its own queue or taken from the shared one, and not yet done. Counted
    /// from the moment a request is sent, not when the worker gets the GIL to run it: a worker
    /// that took a request but waits for the GIL is busy, and a home chosen meanwhile must not
    /// land behind that request.
    load: AtomicUsize,
    /// Stuck in code that ignores cancellation: it homes nobody until its request returns.
    written_off: AtomicBool,
}

impl Worker {
    fn candidate(&self, homes: usize) -> Candidate {
        let load = self.load.load(Ordering::Acquire);
        Candidate { worker: self.id, busy: load > 0, load, homes }
    }

    /// Sends `job` to this worker's own queue. Callers hold `sched`, so a home chosen after
    /// this sees the load.
    fn give(&self, job: Arc<Job>) {
        self.load.fetch_add(1, Ordering::AcqRel);
        // The receiver lives as long as the worker, which is in `workers`.
        let _ = self.tx.send(job);
    }
}

/// Counters for `stats`.
pub struct PoolStats {
    pub workers: usize,
    pub busy: usize,
    pub queued: usize,
    pub abandoned: usize,
    /// Per worker, in the order they started: processes homed there, requests queued there.
    pub threads: Vec<(usize, usize)>,
}

impl Pool {
    /// Creates the pool and starts its hot workers, the spare manager and the canceller.
    pub fn start(
        cfg: PoolConfig,
        interp: Arc<Interp>,
        out: Outbox,
        aio: Option<Arc<Aio>>,
        turn: Option<Arc<Turn>>,
    ) -> std::io::Result<Arc<Pool>> {
        // Decided now, on this thread, before Python code could change any affinity.
        crate::spin::spinning_pays();
        let (jobs_tx, jobs_rx) = unbounded();
        let (kick_tx, kick_rx) = bounded(1);
        // A written-off worker no longer counts, and the processes homed there need a new
        // home: the manager sees to both.
        let (off_tx, off_rx) = unbounded();
        let canceller = Canceller::start(cfg.cancel, out.clone(), move |worker| {
            let _ = off_tx.send(worker);
        })?;
        static NEXT_POOL: AtomicUsize = AtomicUsize::new(0);
        let pool = Arc::new(Pool {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            jobs_tx,
            jobs_rx,
            out,
            interp,
            cfg,
            total: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            canceller,
            kick_tx,
            sched: Mutex::new(Sched::default()),
            aio,
            turn,
            route: std::sync::OnceLock::new(),
        });
        for _ in 0..cfg.hot.max(1) {
            pool.spawn_worker(&mut pool.sched.lock(), true)?;
        }
        let p = pool.clone();
        thread::Builder::new()
            .name("pyport-spares".into())
            .spawn(move || p.manage(kick_rx, off_rx))?;
        Ok(pool)
    }

    /// The pool's number, unique in the process (see `cancel::Slot`).
    pub fn id(&self) -> usize {
        self.id
    }

    /// Sets how a worker that borrowed the turn to read routes what it read (once).
    pub fn set_route(&self, route: Route) {
        let _ = self.route.set(route);
    }

    /// Queues a request the reader just read (a call, an eval or an exec). When every
    /// worker is idle, nothing is queued and requests have not overlapped lately, the turn
    /// to read goes with it (see `turn`). The request is known to the canceller before the
    /// turn is lent: a frame read next by the borrower (its cancellation, its owner's exit)
    /// finds it.
    pub fn submit_request(self: &Arc<Self>, job: Job) {
        let job = self.track(job);
        if let (Some(turn), Some(owner)) = (self.turn.as_ref().filter(|t| t.enabled()), job.owner()) {
            turn.request_of(owner_hash(owner));
        }
        if let Some(turn) = self.turn.as_ref().filter(|t| t.may_lend()) {
            if self.idle.load(Ordering::Acquire) >= self.total.load(Ordering::Acquire) && self.jobs_rx.is_empty() {
                turn.lend();
            } else {
                turn.overlapped();
            }
        }
        self.place(job)
    }

    pub fn submit(self: &Arc<Self>, job: Job) {
        let job = self.track(job);
        self.place(job)
    }

    /// Enters `job` in the canceller's record of what is queued, and its owner's count of
    /// requests in flight.
    fn track(&self, job: Job) -> Arc<Job> {
        // Shared with the canceller's record of what runs, so that nothing about the job is
        // copied or formatted unless a log line needs it.
        let job = Arc::new(job);
        let mut t = self.canceller.tracking.lock();
        t.queued.insert(job.id());
        if let Some(owner) = job.owner() {
            *t.inflight.entry(owner.clone()).or_insert(0) += 1;
        }
        drop(t);
        job
    }

    /// Queues a tracked job: on its owner's home worker, or on the shared queue.
    fn place(self: &Arc<Self>, job: Arc<Job>) {
        let job = match (self.cfg.affinity, job.owner()) {
            (Affinity::None, _) | (_, None) => job,
            (affinity, Some(owner)) => {
                let mut s = self.sched.lock();
                let home = match s.homes.home_of(owner) {
                    Some(w) => Some(w),
                    None if affinity.wants_home(job.uses_namespace()) => self.assign_home(&mut s, owner.clone()),
                    None => None,
                };
                match home.and_then(|w| s.workers.get(&w)) {
                    Some(w) => {
                        w.give(job);
                        return self.queued();
                    }
                    None => job,
                }
            }
        };
        // The receiver lives as long as the pool, so this cannot fail.
        let _ = self.jobs_tx.send(job);
        if self.idle.load(Ordering::Acquire) == 0 {
            let _ = self.kick_tx.try_send(());
        }
        self.queued();
    }

    /// Requests a worker read and ran itself (see `turn`).
    pub fn worker_reads(&self) -> u64 {
        self.turn.as_ref().map_or(0, |t| t.runs_read_by_workers())
    }

    /// This thread is about to wait for a frame (a callback's answer): somebody must read.
    pub fn before_waiting(&self) {
        if let Some(turn) = &self.turn {
            turn.before_waiting();
        }
    }

    /// Work was queued: a worker that borrowed the turn and waits for input must see it.
    fn queued(&self) {
        if let Some(turn) = &self.turn {
            turn.queued();
        }
    }

    /// Chooses a home for `owner` (see `homes::choose`), starting a worker if need be.
    fn assign_home(self: &Arc<Self>, s: &mut Sched, owner: Owner) -> Option<usize> {
        let candidates: Vec<Candidate> = s
            .workers
            .values()
            .filter(|w| !w.written_off.load(Ordering::Acquire))
            .map(|w| w.candidate(s.homes.homes_on(w.id)))
            .collect();
        let worker = match homes::choose(&candidates, self.counted() < self.cfg.max) {
            Choice::Worker(w) => w,
            Choice::Spawn => match self.spawn_worker(s, false) {
                Ok(w) => w,
                Err(_) => match homes::choose(&candidates, false) {
                    Choice::Worker(w) => w,
                    Choice::Spawn => return None,
                },
            },
        };
        s.homes.set(owner, worker);
        Some(worker)
    }

    /// Workers that count against `max_workers`: all but the written-off ones.
    fn counted(&self) -> usize {
        self.total.load(Ordering::Acquire).saturating_sub(self.canceller.abandoned())
    }

    /// The Erlang process `owner` has exited: frees its namespace now, or, if jobs of
    /// its are queued or running, when the last of them is done.
    pub fn owner_down(&self, owner: &Owner) {
        let busy = {
            let mut t = self.canceller.tracking.lock();
            let busy = t.inflight.contains_key(owner);
            if busy {
                t.dead.insert(owner.clone());
            }
            busy
        };
        if !busy {
            self.free_namespace(owner);
        }
    }

    /// Frees a dead owner's namespace, and with it its home.
    fn free_namespace(&self, owner: &Owner) {
        self.interp.drop_namespace(owner);
        self.sched.lock().homes.remove(owner);
    }

    /// Request `id` will run nested in a callback (see `run_nested`): until it starts it
    /// counts as queued, so that a cancellation that comes first is kept for it.
    pub fn expect_nested(&self, id: u64) {
        self.canceller.tracking.lock().queued.insert(id);
    }

    /// Asks for request `id` to be cancelled (returns at once; the work needs the GIL).
    pub fn cancel(&self, id: u64) {
        self.canceller.cancel(id);
    }

    /// Whether request `id` is queued or running here (it may yet return a coroutine).
    pub fn holds(&self, id: u64) -> bool {
        let t = self.canceller.tracking.lock();
        t.queued.contains(&id) || t.running.contains_key(&id) || t.cancelled.contains(&id)
    }

    pub fn stats(&self) -> PoolStats {
        let workers = self.total.load(Ordering::Relaxed);
        let idle = self.idle.load(Ordering::Relaxed);
        let abandoned = self.canceller.abandoned();
        let threads = {
            let s = self.sched.lock();
            s.workers.values().map(|w| (s.homes.homes_on(w.id), w.rx.len())).collect()
        };
        PoolStats { workers, busy: workers.saturating_sub(idle), queued: self.jobs_rx.len(), abandoned, threads }
    }

    /// Starts a worker; returns its id.
    fn spawn_worker(self: &Arc<Self>, s: &mut Sched, hot: bool) -> std::io::Result<usize> {
        // Hot workers always start; spares only below the process-wide cap, which written-off
        // (stuck) threads still count against: they exist.
        if hot {
            crate::threads::reserve_always();
        } else if !crate::threads::try_reserve() {
            return Err(std::io::Error::other("max_threads reached"));
        }
        let (tx, rx) = unbounded();
        let id = s.next_id;
        let worker = Arc::new(Worker {
            id,
            hot,
            tx,
            rx,
            load: AtomicUsize::new(0),
            written_off: AtomicBool::new(false),
        });
        let pool = self.clone();
        let me = worker.clone();
        let name = if hot { "pyport-worker" } else { "pyport-spare" };
        self.total.fetch_add(1, Ordering::AcqRel);
        let spawned = thread::Builder::new()
            .name(name.into())
            .stack_size(PYTHON_THREAD_STACK)
            .spawn(move || pool.worker_loop(me));
        if let Err(e) = spawned {
            self.total.fetch_sub(1, Ordering::AcqRel);
            crate::threads::release();
            return Err(e);
        }
        s.next_id += 1;
        s.workers.insert(id, worker);
        Ok(id)
    }

    /// The manager: starts spares for a shared queue that waits, and finds new homes for the
    /// processes of written-off workers.
    fn manage(self: Arc<Self>, kicks: Receiver<()>, write_offs: Receiver<usize>) {
        loop {
            select! {
                recv(kicks) -> kick => match kick {
                    Ok(()) => self.add_spares(),
                    Err(_) => return,
                },
                recv(write_offs) -> worker => match worker {
                    Ok(worker) => {
                        self.rehome(worker);
                        self.add_spares();
                    }
                    Err(_) => return,
                },
            }
        }
    }

    fn add_spares(self: &Arc<Self>) {
        loop {
            thread::sleep(self.cfg.spare_after);
            if self.jobs_rx.is_empty() || self.idle.load(Ordering::Acquire) > 0 {
                return;
            }
            if self.counted() >= self.cfg.max || self.spawn_worker(&mut self.sched.lock(), false).is_err() {
                return;
            }
        }
    }

    /// `worker` is stuck in code that ignores cancellation: the processes homed there, and the
    /// requests waiting in its queue, move to other workers.
    fn rehome(self: &Arc<Self>, worker: usize) {
        let mut s = self.sched.lock();
        let Some(old) = s.workers.get(&worker).cloned() else { return };
        old.written_off.store(true, Ordering::Release);
        for owner in s.homes.owners_on(worker) {
            s.homes.remove(&owner);
            let new = self.assign_home(&mut s, owner.clone());
            let msg = format!(
                "the home thread of {} is stuck in code that ignores cancellation; its namespace \
                 moved to thread {} and keeps its values, but objects bound to the old thread \
                 (sqlite3 connections, thread-locals) may refuse to work there",
                protocol::describe_pid(&owner),
                new.map_or_else(|| "(shared queue)".to_string(), |w| w.to_string())
            );
            self.out.log("warning", "pyport", msg.as_bytes());
        }
        while let Ok(job) = old.rx.try_recv() {
            old.load.fetch_sub(1, Ordering::AcqRel);
            match job.owner().and_then(|o| s.homes.home_of(o)).and_then(|w| s.workers.get(&w)) {
                Some(w) => w.give(job),
                // The receiver lives as long as the pool.
                None => drop(self.jobs_tx.send(job)),
            }
        }
        self.queued();
    }
}

/// A hash of a process, to tell callers apart (see `Turn::request_of`).
fn owner_hash(owner: &Owner) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(owner)
}

/// Cuts a string for a log line.
fn clip(s: &str) -> String {
    const MAX: usize = 120;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}
