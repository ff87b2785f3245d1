//! The event loop's threads: each is attached to Python for life, runs the loop while it
//! holds the baton and parks otherwise; and the hand-over around a wait outside Python in
//! the middle of a coroutine ([`begin_wait`]).

use super::baton::{Boundary, Next};
use super::{Aio, Message};
use crate::exec::{self, Failure};
use crate::protocol::{self, atom};
use crate::python::PYTHON_THREAD_STACK;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyModule};
use std::cell::RefCell;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

thread_local! {
    /// On the event loop's threads: the loop and this thread's baton token.
    static DRIVER: RefCell<Option<(Arc<Aio>, u64)>> = const { RefCell::new(None) };
}

const DRIVER_PY: &str = include_str!("driver.py");

impl Aio {
    /// Starts a thread that drives the loop as `token` (it holds the baton already). The
    /// caller has counted it (`threads`).
    pub(super) fn spawn_driver(self: &Arc<Self>, token: u64) -> std::io::Result<()> {
        let me = self.clone();
        thread::Builder::new()
            .name("pyport-asyncio".into())
            .stack_size(PYTHON_THREAD_STACK)
            .spawn(move || me.driver_thread(token))
            .map(drop)
    }

    fn driver_thread(self: Arc<Self>, token: u64) {
        DRIVER.with(|d| *d.borrow_mut() = Some((self.clone(), token)));
        let written_off = Python::attach(|py| {
            // Requests nested in a callback of a coroutine run on this thread while it waits
            // for Erlang: the pool's canceller watches them there, as on its workers.
            if let Some(pool) = self.pool_id.get() {
                crate::cancel::set_current_slot(Arc::new(crate::cancel::Slot::loop_thread(*pool)));
            }
            self.drive(py, token)
        });
        DRIVER.with(|d| d.borrow_mut().take());
        if written_off {
            crate::cancel::written_off_returned();
        }
        crate::threads::release();
    }

    /// Drives the loop whenever this thread holds the baton. Returns when the thread leaves:
    /// true if it had been written off.
    fn drive(self: &Arc<Self>, py: Python<'_>, token: u64) -> bool {
        let (module, event_loop) = match self.setup(py) {
            Ok(x) => x,
            Err(e) => {
                // A later thread that cannot set up (memory) hands the loop to one that has;
                // with none, no coroutine can run.
                if self.baton.pass_to_waiting(token) {
                    self.out.log("warning", "pyport", format!("an event loop thread cannot start: {e}").as_bytes());
                    return false;
                }
                let msg = format!("cannot start the asyncio event loop; async calls now fail: {e}");
                self.out.log("error", "pyport", msg.as_bytes());
                self.fail_all(py, exec::python_error(py, &e));
                return false;
            }
        };
        let (begin, end) = match self.boundary_functions(py, token) {
            Ok(f) => f,
            Err(e) => {
                self.out.log("error", "pyport", format!("the event loop's thread cannot start: {e}").as_bytes());
                return false;
            }
        };
        loop {
            self.took_baton(py, &module, &event_loop, token);
            let driven = module.call_method1("drive", (&event_loop, &begin, &end));
            if self.baton.returned(token) {
                return true;
            }
            if self.baton.holds(token) {
                // A coroutine's SystemExit or KeyboardInterrupt comes out of the loop after
                // asyncio has made it its task's exception (which answers that request);
                // anything else is ours to report. Either way the loop runs on.
                if let Err(e) = driven {
                    let quiet = e.is_instance_of::<pyo3::exceptions::PySystemExit>(py)
                        || e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py);
                    if !quiet {
                        self.out.log("warning", "pyport", format!("the event loop raised: {e}").as_bytes());
                    }
                }
                continue;
            }
            // The baton went to a thread that resumes its step: park until it comes back.
            if !py.detach(|| self.baton.park(token)) {
                return false;
            }
        }
    }

    /// The driver module and the loop (made by the first thread), adopted by this thread.
    fn setup<'py>(self: &Arc<Self>, py: Python<'py>) -> PyResult<(Bound<'py, PyModule>, Bound<'py, PyAny>)> {
        let module = match self.module.get() {
            Some(m) => m.bind(py).clone(),
            None => {
                let code = CString::new(DRIVER_PY).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
                let m = PyModule::from_code(py, &code, c"pyport_aio_driver.py", c"_pyport_aio")?;
                let _ = self.module.set(m.clone().unbind());
                m
            }
        };
        let event_loop = match self.event_loop.get() {
            Some(l) => l.bind(py).clone(),
            None => {
                let l = self.new_loop(py, &module)?;
                let _ = self.event_loop.set(l.clone().unbind());
                l
            }
        };
        module.call_method1("adopt", (&event_loop,))?;
        Ok((module, event_loop))
    }

    fn new_loop<'py>(self: &Arc<Self>, py: Python<'py>, module: &Bound<'py, PyModule>) -> PyResult<Bound<'py, PyAny>> {
        let me = self.clone();
        // What a written-off thread's remains raise (its task no longer matches the loop's
        // current one) is not worth a log line.
        let filter = PyCFunction::new_closure(py, Some(c"pyport_loop_error_filter"), None, move |_args, _kwargs| -> bool {
            DRIVER.with(|d| d.borrow().as_ref().map(|(_, t)| *t)).is_some_and(|t| me.baton.is_written_off(t))
        })?;
        let event_loop = module.call_method1("new_loop", (filter,))?;
        let me = self.clone();
        let lp = event_loop.clone().unbind();
        let drain = PyCFunction::new_closure(py, Some(c"pyport_async_inbox"), None, move |args, _kwargs| {
            let py = args.py();
            me.drain(py, lp.bind(py));
        })?;
        use std::os::fd::AsRawFd;
        event_loop.call_method1("add_reader", (self.wake_rx.as_raw_fd(), drain))?;
        Ok(event_loop)
    }

    /// `begin()`, asked before each callback (false: this thread no longer holds the loop),
    /// and `end()`, after it: they tell the watcher which callback runs since when.
    fn boundary_functions<'py>(self: &Arc<Self>, py: Python<'py>, token: u64) -> PyResult<(Bound<'py, PyCFunction>, Bound<'py, PyCFunction>)> {
        let me = self.clone();
        let begin = PyCFunction::new_closure(py, Some(c"pyport_loop_begin"), None, move |args, _kwargs| -> PyResult<bool> {
            let (more, due): (bool, Option<f64>) = args.extract()?;
            Ok(match me.baton.at_boundary(token) {
                Boundary::Drive => {
                    if me.progress.token.load(Ordering::Acquire) == token {
                        let now = me.nanos();
                        let waiting = match (more, due) {
                            (true, _) => now,
                            (false, Some(at)) => me.loop_time_nanos(at),
                            (false, None) => 0,
                        };
                        me.progress.seq.fetch_add(1, Ordering::AcqRel);
                        me.progress.waiting_since.store(waiting, Ordering::Release);
                        me.progress.since.store(now, Ordering::Release);
                    }
                    true
                }
                Boundary::HandedOver(_) => false,
                Boundary::Leave(next) => {
                    if let Some(next) = next {
                        me.start_next(next);
                    }
                    false
                }
            })
        })?;
        let me = self.clone();
        let end = PyCFunction::new_closure(py, Some(c"pyport_loop_end"), None, move |_args, _kwargs| {
            if me.progress.token.load(Ordering::Acquire) == token {
                me.progress.since.store(0, Ordering::Release);
            }
        })?;
        Ok((begin, end))
    }

    /// The calling thread holds the baton now: the loop and the watcher learn it.
    fn took_baton(&self, py: Python<'_>, module: &Bound<'_, PyModule>, event_loop: &Bound<'_, PyAny>, token: u64) {
        // SAFETY: plain queries of the calling thread's ids.
        let (ident, tid) = unsafe { (pyo3::ffi::PyThread_get_thread_ident(), libc::gettid()) };
        self.progress.ident.store(ident as u64, Ordering::Release);
        self.progress.tid.store(tid as u64, Ordering::Release);
        self.progress.since.store(0, Ordering::Release);
        self.progress.token.store(token, Ordering::Release);
        let _ = module.call_method1("take", (event_loop,));
        let _ = py;
    }

    /// The loop's reader callback: does what the inbox asks.
    fn drain(self: &Arc<Self>, py: Python<'_>, event_loop: &Bound<'_, PyAny>) {
        // Emptied first: a wake-up written after this belongs to messages taken later.
        self.clear_wake();
        let messages = self.inbox.lock().take();
        self.watch.changed();
        for m in messages {
            match m {
                Message::Start { id, coro, cancelled } => self.start_task(py, event_loop, id, coro, cancelled),
                Message::Cancel(id) => self.cancel_task(py, id),
                Message::Drop(id) => self.drop_task(py, id),
            }
        }
    }

    fn start_task(self: &Arc<Self>, py: Python<'_>, event_loop: &Bound<'_, PyAny>, id: u64, coro: Py<PyAny>, cancelled: bool) {
        let coro = coro.into_bound(py);
        let caller = self.tasks.lock().by_id.get(&id).and_then(|e| e.request.caller().cloned());
        let task = match self.create_task(py, event_loop, id, &coro, caller.as_ref()) {
            Ok(t) => t,
            Err(e) => {
                let _ = coro.call_method0("close");
                return self.answer(id, exec::finish(py, id, Err(Failure::Python(e))));
            }
        };
        {
            let mut tasks = self.tasks.lock();
            tasks.by_task.insert(task.as_ptr() as usize, id);
            if let Some(e) = tasks.by_id.get_mut(&id) {
                e.task = Some(task.clone().unbind());
                if cancelled {
                    e.cancel_delivered = Some(Instant::now());
                }
            }
        }
        if cancelled {
            // Its body never starts; the reply is `cancelled`.
            let _ = task.call_method0("cancel");
        }
    }

    /// `loop.create_task(coro)` in a context whose caller is the request's, with a
    /// done-callback that answers request `id`.
    fn create_task<'py>(
        self: &Arc<Self>,
        py: Python<'py>,
        event_loop: &Bound<'py, PyAny>,
        id: u64,
        coro: &Bound<'py, PyAny>,
        caller: Option<&protocol::Owner>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("context", crate::pylog::task_context(py, caller)?)?;
        let task = event_loop.call_method("create_task", (coro,), Some(&kwargs))?;
        let me = self.clone();
        let done = PyCFunction::new_closure(py, Some(c"pyport_async_done"), None, move |args, _kwargs| -> PyResult<()> {
            me.task_done(args.py(), id, &args.get_item(0)?);
            Ok(())
        })?;
        task.call_method1("add_done_callback", (done,))?;
        Ok(task)
    }

    fn cancel_task(&self, py: Python<'_>, id: u64) {
        let (task, waiting) = {
            let mut tasks = self.tasks.lock();
            let Some(e) = tasks.by_id.get_mut(&id) else { return };
            e.cancel_delivered = Some(Instant::now());
            (e.task.as_ref().map(|t| t.clone_ref(py)), e.waiting.clone())
        };
        // A step waiting for Erlang on another thread ends its wait (see `begin_wait`).
        if let Some(w) = waiting {
            w.store(true, Ordering::Release);
        }
        // Only schedules the CancelledError; no Python code of the task runs here.
        if let Some(t) = task {
            let _ = t.bind(py).call_method0("cancel");
        }
        self.watch.changed();
    }

    /// Task `id` swallowed its cancellation for the grace period: it no longer counts, and
    /// its coroutine is closed (GeneratorExit at its `await`) by a callback of its own,
    /// since its `finally` is user code that may block like any other.
    fn drop_task(&self, py: Python<'_>, id: u64) {
        let task = {
            let tasks = self.tasks.lock();
            let Some(e) = tasks.by_id.get(&id) else { return };
            e.task.as_ref().map(|t| t.clone_ref(py))
        };
        let what = self.what(id);
        self.answer(id, protocol::error_frame(Some(id), atom("cancelled")));
        let msg = format!(
            "{what} ignored its cancellation for {} ms: it no longer counts in async_tasks and its coroutine is closed",
            self.cfg.abandon_after.as_millis()
        );
        self.out.log("warning", "pyport", msg.as_bytes());
        if let Some(task) = task {
            if let Err(e) = self.schedule_close(py, task) {
                self.out.log("warning", "pyport", format!("{what}: cannot close it: {e}").as_bytes());
            }
        }
    }

    fn schedule_close(&self, py: Python<'_>, task: Py<PyAny>) -> PyResult<()> {
        let (Some(module), Some(event_loop)) = (self.module.get(), self.event_loop.get()) else { return Ok(()) };
        let out = self.out.clone();
        let report = PyCFunction::new_closure(py, Some(c"pyport_close_report"), None, move |args, _kwargs| -> PyResult<()> {
            let text: String = args.get_item(0)?.extract()?;
            out.log("warning", "pyport", format!("a dropped task: {text}").as_bytes());
            Ok(())
        })?;
        let close = module.bind(py).getattr("close_dropped")?;
        event_loop.bind(py).call_method1("call_soon", (close, task, report))?;
        Ok(())
    }

    /// Wakes or starts the thread that gets the baton after a hand-over.
    pub(super) fn start_next(self: &Arc<Self>, next: Next) {
        if let Next::Spawn(t) = next {
            // A replacement always starts: waits that need one have reserved it, and the
            // write-offs it replaces are bounded.
            crate::threads::reserve_always();
            if let Err(e) = self.spawn_driver(t) {
                crate::threads::release();
                let msg = format!("cannot start a thread for the event loop: {e}");
                crate::cancel::exit_with_report(&self.out, crate::cancel::EXIT_STUCK_WORKERS, &msg, crate::cancel::running_everywhere());
            }
        }
    }

    /// The done-callback of request `id`'s task: its reply, shaped as a synchronous call's.
    fn task_done(&self, py: Python<'_>, id: u64, task: &Bound<'_, PyAny>) {
        let requested = self.tasks.lock().by_id.get(&id).map(|e| e.cancel_asked.is_some());
        let Some(requested) = requested else {
            // Answered already (written off, dropped): the outcome is read, so that asyncio
            // does not log it as never retrieved.
            let _ = task.call_method0("cancelled").and_then(|c| if c.is_truthy()? { Ok(c) } else { task.call_method0("exception") });
            return;
        };
        let cancelled = requested || task.call_method0("cancelled").and_then(|c| c.is_truthy()).unwrap_or(true);
        let frame = if cancelled {
            protocol::error_frame(Some(id), atom("cancelled"))
        } else {
            exec::finish(py, id, task_outcome(task))
        };
        self.answer(id, frame);
    }
}

/// A finished, not cancelled task's result or exception.
fn task_outcome<'py>(task: &Bound<'py, PyAny>) -> Result<Bound<'py, PyAny>, Failure> {
    let exc = task.call_method0("exception")?;
    if exc.is_none() {
        Ok(task.call_method0("result")?)
    } else {
        Err(Failure::Python(PyErr::from_value(exc)))
    }
}

/// A wait outside Python by the thread that runs the loop, in the middle of a callback:
/// the loop went to another thread for its duration (see [`begin_wait`]).
pub struct LoopWait {
    aio: Arc<Aio>,
    me: u64,
    /// The task whose step waits, and its request, if the callback is a task's step.
    task: Option<(Py<PyAny>, Option<u64>)>,
    /// Set when the task is cancelled: the wait must end.
    cancelled: Arc<AtomicBool>,
    /// The thread kept the loop (no other thread could run it).
    held: bool,
}

/// Called by code about to wait outside Python (a callback into Erlang): on the thread that
/// runs the event loop, the loop goes to another thread for the duration of the wait, so
/// that the other coroutines go on; [`LoopWait::end`] takes it back. None elsewhere (a
/// worker, a thread Python code started), and where no other thread may start
/// (`max_threads`): the wait then holds the loop, as it would in plain asyncio.
pub fn begin_wait(py: Python<'_>) -> Option<LoopWait> {
    let (aio, me) = DRIVER.with(|d| d.borrow().clone())?;
    aio.begin_wait(py, me)
}

impl Aio {
    fn begin_wait(self: &Arc<Self>, py: Python<'_>, me: u64) -> Option<LoopWait> {
        // The thread leaves the loop before anything else: the watcher must not take a
        // thread that is handing the loop over for a stuck one (see `watch::write_off`).
        if self.progress.token.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return None;
        }
        self.progress.since.store(0, Ordering::Release);
        let (Some(module), Some(event_loop)) = (self.module.get(), self.event_loop.get()) else {
            return self.hold_loop(me, None);
        };
        let (module, event_loop) = (module.bind(py), event_loop.bind(py));
        let task = module.call_method1("current_task", (event_loop,)).ok().filter(|t| !t.is_none());
        let cancelled = Arc::new(AtomicBool::new(false));
        let id = task.as_ref().and_then(|t| self.mark_waiting(t, &cancelled));
        let reserved = self.baton.needs_new_thread() && crate::threads::try_reserve();
        if !reserved && self.baton.needs_new_thread() {
            // No thread may start (max_threads): the wait holds the loop, as in plain
            // asyncio; the watcher leaves a waiting thread alone.
            return self.hold_loop(me, task.map(|t| (t.unbind(), id, cancelled)));
        }
        if let Some(t) = &task {
            if module.call_method1("leave", (event_loop, t)).is_err() {
                if reserved {
                    crate::threads::release();
                }
                return self.hold_loop(me, Some((t.clone().unbind(), id, cancelled)));
            }
        }
        let wait = LoopWait { aio: self.clone(), me, task: task.map(|t| (t.unbind(), id)), cancelled, held: false };
        match self.baton.leave_for_wait(me) {
            Some(Next::Wake(_)) => {
                if reserved {
                    crate::threads::release();
                }
            }
            Some(Next::Spawn(t)) => {
                if !reserved {
                    crate::threads::reserve_always();
                }
                if let Err(e) = self.spawn_driver(t) {
                    crate::threads::release();
                    self.baton.spawn_failed(t, me);
                    self.out.log("warning", "pyport", format!("cannot start a thread for the event loop: {e}").as_bytes());
                    wait.resume(py);
                    return None;
                }
            }
            None => {
                // Written off meanwhile: this thread no longer runs the loop at all.
                if reserved {
                    crate::threads::release();
                }
                return None;
            }
        }
        Some(wait)
    }

    /// The task `t` waits outside the loop: its cancellation must end the wait.
    fn mark_waiting(&self, t: &Bound<'_, PyAny>, cancelled: &Arc<AtomicBool>) -> Option<u64> {
        let mut tasks = self.tasks.lock();
        let id = *tasks.by_task.get(&(t.as_ptr() as usize))?;
        if let Some(e) = tasks.by_id.get_mut(&id) {
            e.waiting = Some(cancelled.clone());
            if e.cancel_asked.is_some() {
                cancelled.store(true, Ordering::Release);
            }
        }
        Some(id)
    }

    /// A wait that keeps the loop (no other thread may run it): the thread stays the
    /// holder, but counts as running no callback meanwhile, so the watcher does not take
    /// it for stuck.
    fn hold_loop(self: &Arc<Self>, me: u64, task: Option<(Py<PyAny>, Option<u64>, Arc<AtomicBool>)>) -> Option<LoopWait> {
        let (task, cancelled) = match task {
            Some((t, id, c)) => (Some((t, id)), c),
            None => (None, Arc::new(AtomicBool::new(false))),
        };
        Some(LoopWait { aio: self.clone(), me, task, cancelled, held: true })
    }
}

impl LoopWait {
    /// Whether the waiting task was cancelled (its caller gave up): the wait ends with
    /// `CancelledError`.
    pub fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Whether a task waits (it waits as long as it lives), rather than a plain callback of
    /// the loop (which waits at most `callback_timeout`).
    pub fn in_task(&self) -> bool {
        self.task.as_ref().is_some_and(|(_, id)| id.is_some())
    }

    /// The wait is over: takes the loop back, at the next boundary between two callbacks of
    /// the thread that runs it now (a stuck one is written off: the watcher counts a thread
    /// waiting to resume as work waiting for the loop).
    pub fn end(self, py: Python<'_>) {
        if !self.held {
            self.aio.baton.want_back(self.me);
            // The loop may sleep in `select`: the pipe wakes it.
            self.aio.wake();
            self.aio.watch.changed();
            py.detach(|| self.aio.baton.wait_for(self.me));
        }
        self.resume(py);
    }

    /// Holding the baton again: the task's step goes on in the loop.
    fn resume(&self, py: Python<'_>) {
        if let Some((_, Some(id))) = &self.task {
            if let Some(e) = self.aio.tasks.lock().by_id.get_mut(id) {
                e.waiting = None;
            }
        }
        let (Some(module), Some(event_loop)) = (self.aio.module.get(), self.aio.event_loop.get()) else {
            self.aio.progress.token.store(self.me, Ordering::Release);
            return;
        };
        let (module, event_loop) = (module.bind(py), event_loop.bind(py));
        self.aio.took_baton(py, module, event_loop, self.me);
        self.aio.progress.seq.fetch_add(1, Ordering::AcqRel);
        self.aio.progress.waiting_since.store(0, Ordering::Release);
        self.aio.progress.since.store(self.aio.nanos(), Ordering::Release);
        if self.held {
            return;
        }
        if let Some((task, _)) = &self.task {
            if let Err(e) = module.call_method1("enter", (event_loop, task.bind(py))) {
                self.aio.out.log("warning", "pyport", format!("a coroutine back from Erlang: {e}").as_bytes());
            }
        }
    }
}
