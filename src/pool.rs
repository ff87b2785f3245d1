//! The elastic pool of Python worker threads, and cancellation.
//!
//! * Hot workers (`--workers`, default 1: on 2 cores one worker was fastest for GIL-bound
//!   calls) live for the life of the port.
//! * When the queue is non-empty and no worker has been idle for `--spare-after-ms`, the
//!   manager thread starts a spare worker, up to `--max-workers`; spares exit after a while
//!   without work. So a call that sleeps, blocks or loops never stalls every other caller.
//! * Each worker attaches to the interpreter once and keeps its thread state for life
//!   (thread-locals survive between calls); it detaches only while waiting for a job. It
//!   never blocks on a channel or a lock that another thread holds while waiting for the
//!   GIL: that deadlocked `threading.Thread.start()` in the prototype.
//! * Cancellation, write-offs of stuck workers and the GIL watchdog live in `cancel`; the
//!   pool reports to it which request runs where, and clears a cancellation that arrived
//!   too late before a worker's next request.

use crate::cancel::{CancelConfig, Canceller, Running, Slot};
use crate::exec::{Frame, Interp, Mode};
use crate::framing::Outbox;
use crate::protocol::{self, atom, binary, tuple, Owner};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Python recursion and our converters recurse; give every Python thread room for both.
pub const PYTHON_THREAD_STACK: usize = 16 << 20;

pub enum Job {
    Call { id: u64, owner: Owner, module: String, function: String, payload: Vec<u8> },
    Code { id: u64, owner: Owner, code: String, payload: Vec<u8>, mode: Mode },
    Startup { id: u64, sys_path: Vec<String>, code: String },
}

impl Job {
    /// The process whose namespace the job uses (start-up code has none).
    fn owner(&self) -> Option<&Owner> {
        match self {
            Job::Call { owner, .. } | Job::Code { owner, .. } => Some(owner),
            Job::Startup { .. } => None,
        }
    }

    /// What the job runs, for the logs when it gets stuck.
    fn describe(&self) -> String {
        match self {
            Job::Call { module, function, .. } => format!("call {}", clip(&format!("{module}.{function}"))),
            Job::Code { code, mode, .. } => {
                let verb = if *mode == Mode::Eval { "eval" } else { "exec" };
                let first = code.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
                format!("{verb} {}", clip(first))
            }
            Job::Startup { .. } => "start-up code".to_string(),
        }
    }

    fn id(&self) -> u64 {
        match self {
            Job::Call { id, .. } | Job::Code { id, .. } | Job::Startup { id, .. } => *id,
        }
    }

    fn run(&self, py: Python<'_>, interp: &Interp) -> Frame {
        match self {
            Job::Call { id, owner, module, function, payload } => {
                interp.run_call(py, *id, owner, module, function, payload)
            }
            Job::Code { id, owner, code, payload, mode } => interp.run_code(py, *id, owner, code, payload, *mode),
            Job::Startup { id, sys_path, code } => interp.run_startup(py, *id, sys_path, code),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub hot: usize,
    pub max: usize,
    pub spare_after: Duration,
    pub spare_idle: Duration,
    pub cancel: CancelConfig,
}

pub struct Pool {
    jobs_tx: Sender<Job>,
    jobs_rx: Receiver<Job>,
    out: Outbox,
    interp: Arc<Interp>,
    cfg: PoolConfig,
    total: AtomicUsize,
    idle: AtomicUsize,
    canceller: Arc<Canceller>,
    kick_tx: Sender<()>,
}

/// Counters for `stats`.
pub struct PoolStats {
    pub workers: usize,
    pub busy: usize,
    pub queued: usize,
    pub abandoned: usize,
}

impl Pool {
    /// Creates the pool and starts its hot workers, the spare manager and the canceller.
    pub fn start(cfg: PoolConfig, interp: Arc<Interp>, out: Outbox) -> std::io::Result<Arc<Pool>> {
        let (jobs_tx, jobs_rx) = unbounded();
        let (kick_tx, kick_rx) = bounded(1);
        // A written-off worker no longer counts: the manager may start a spare in its place.
        let kick = kick_tx.clone();
        let canceller = Canceller::start(cfg.cancel, out.clone(), move || {
            let _ = kick.try_send(());
        })?;
        let pool = Arc::new(Pool {
            jobs_tx,
            jobs_rx,
            out,
            interp,
            cfg,
            total: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            canceller,
            kick_tx,
        });
        for _ in 0..cfg.hot.max(1) {
            pool.spawn_worker(true)?;
        }
        let p = pool.clone();
        thread::Builder::new().name("pyport-spares".into()).spawn(move || p.manage_spares(kick_rx))?;
        Ok(pool)
    }

    pub fn submit(&self, job: Job) {
        {
            let mut t = self.canceller.tracking.lock();
            t.queued.insert(job.id());
            if let Some(owner) = job.owner() {
                *t.inflight.entry(owner.clone()).or_insert(0) += 1;
            }
        }
        // The receiver lives as long as the pool, so this cannot fail.
        let _ = self.jobs_tx.send(job);
        if self.idle.load(Ordering::Acquire) == 0 {
            let _ = self.kick_tx.try_send(());
        }
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
            self.interp.drop_namespace(owner);
        }
    }

    /// Asks for request `id` to be cancelled (returns at once; the work needs the GIL).
    pub fn cancel(&self, id: u64) {
        self.canceller.cancel(id);
    }

    pub fn stats(&self) -> PoolStats {
        let workers = self.total.load(Ordering::Relaxed);
        let idle = self.idle.load(Ordering::Relaxed);
        let abandoned = self.canceller.abandoned();
        PoolStats { workers, busy: workers.saturating_sub(idle), queued: self.jobs_rx.len(), abandoned }
    }

    fn spawn_worker(self: &Arc<Self>, hot: bool) -> std::io::Result<()> {
        self.total.fetch_add(1, Ordering::AcqRel);
        let pool = self.clone();
        let name = if hot { "pyport-worker" } else { "pyport-spare" };
        let spawned = thread::Builder::new()
            .name(name.into())
            .stack_size(PYTHON_THREAD_STACK)
            .spawn(move || pool.worker_loop(hot));
        if spawned.is_err() {
            self.total.fetch_sub(1, Ordering::AcqRel);
        }
        spawned.map(drop)
    }

    fn manage_spares(self: Arc<Self>, kicks: Receiver<()>) {
        for () in kicks.iter() {
            loop {
                thread::sleep(self.cfg.spare_after);
                if self.jobs_rx.is_empty() || self.idle.load(Ordering::Acquire) > 0 {
                    break;
                }
                let written_off = self.canceller.abandoned();
                let counted = self.total.load(Ordering::Acquire).saturating_sub(written_off);
                if counted >= self.cfg.max || self.spawn_worker(false).is_err() {
                    break;
                }
            }
        }
    }

    fn worker_loop(self: Arc<Self>, hot: bool) {
        Python::attach(|py| {
            let slot = Arc::new(Slot::current());
            let mut reply: Option<Frame> = None;
            loop {
                self.idle.fetch_add(1, Ordering::AcqRel);
                let job = py.detach(|| {
                    // The reply goes out here, detached: writing may block on the pipe.
                    if let Some(frame) = reply.take() {
                        self.deliver(frame);
                    }
                    if hot {
                        self.poll_for_job().or_else(|| self.jobs_rx.recv().ok())
                    } else {
                        self.jobs_rx.recv_timeout(self.cfg.spare_idle).ok()
                    }
                });
                let idle_now = self.idle.fetch_sub(1, Ordering::AcqRel) - 1;
                let Some(job) = job else { break };
                // Work still queued and nobody left to take it: the manager decides whether
                // to add a spare. (Submitters kick too, but only see the pool as it was.)
                if idle_now == 0 && !self.jobs_rx.is_empty() {
                    let _ = self.kick_tx.try_send(());
                }
                reply = Some(self.run_tracked(py, &slot, &job));
            }
        });
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    /// Polls briefly for the next job, but only while this is the pool's only worker (the
    /// default pool serving a sequential caller). With several workers, a polling one takes
    /// jobs while another holds the GIL and the two hand it back and forth: 64 callers on
    /// 16 hot workers ran at half the calls/s. And every polling thread takes a core from
    /// the VM itself, which has only two here.
    fn poll_for_job(&self) -> Option<Job> {
        if self.total.load(Ordering::Acquire) > 1 {
            return None;
        }
        spin_for_job(&self.jobs_rx)
    }

    /// With no other work waiting, latency wins: write the reply on this thread. Under load,
    /// queue it, so that the writer batches replies into few writes.
    fn deliver(&self, frame: Frame) {
        if self.jobs_rx.is_empty() {
            self.out.send_now(frame);
        } else {
            self.out.send(frame);
        }
    }

    fn run_tracked(&self, py: Python<'_>, slot: &Arc<Slot>, job: &Job) -> Frame {
        let id = job.id();
        {
            let mut t = self.canceller.tracking.lock();
            t.queued.remove(&id);
            let owner_dead = job.owner().is_some_and(|o| t.dead.contains(o));
            if t.cancelled.remove(&id) || owner_dead {
                let last = job.owner().is_some_and(|o| t.job_done(o));
                drop(t);
                if let (true, Some(owner)) = (last, job.owner()) {
                    self.interp.drop_namespace(owner);
                }
                return protocol::error_frame(Some(id), atom("cancelled"));
            }
            t.running.insert(id, Running::new(slot.clone(), job.owner().cloned(), job.describe()));
        }
        let frame = catch_unwind(AssertUnwindSafe(|| job.run(py, &self.interp))).unwrap_or_else(|panic| {
            let msg = panic_message(&panic);
            protocol::error_frame(Some(id), tuple(vec![atom("internal_error"), binary(msg.as_bytes())]))
        });
        if crate::forks::in_forked_child() {
            // Python code forked and the child returned here: the rest is the parent's.
            // SAFETY: _exit ends the child without touching state it shares with the parent.
            unsafe { libc::_exit(0) }
        }
        let free_namespace = {
            let mut t = self.canceller.tracking.lock();
            t.running.remove(&id);
            t.cancelled.remove(&id);
            t.abandoned.remove(&id);
            job.owner().is_some_and(|o| t.job_done(o))
        };
        if let (true, Some(owner)) = (free_namespace, job.owner()) {
            self.interp.drop_namespace(owner);
        }
        // A cancel that arrived after the code finished must not hit the next request.
        slot.clear_pending_cancel(py);
        frame
    }
}

/// How long an idle worker polls for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(30);

/// A sequential caller's next request tends to arrive a few microseconds after the reply;
/// a worker that has gone to sleep by then costs a wake-up, which on a virtual machine is
/// often the largest single cost of a round trip. Polling briefly first avoids it.
pub fn spin_for_job<T>(rx: &Receiver<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Ok(job) = rx.try_recv() {
            return Some(job);
        }
        if start.elapsed() >= SPIN {
            return None;
        }
        std::hint::spin_loop();
    }
}

/// Cuts a string for a log line.
fn clip(s: &str) -> String {
    const MAX: usize = 120;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}
