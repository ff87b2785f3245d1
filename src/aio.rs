//! `async def`: a `call` or `eval` whose result is a coroutine is awaited on one asyncio event
//! loop, and the caller gets the coroutine's result (or its exception) as the reply.
//!
//! * **One loop thread**, started on first use: a thread attached to Python for life (like a
//!   worker) that runs `loop.run_forever()`. Many coroutines share it, so their number is not
//!   bounded by `--max-workers`: the worker that got the coroutine queues it here and is free
//!   at once; it sends no reply.
//! * **An inbox** (a Rust queue) carries what the loop must do: start a task, cancel one. The
//!   worker and the reader thread push to it without running any Python code (an asynchronous
//!   cancellation cannot strike halfway through a hand-off) and wake the loop by writing a byte
//!   to a pipe that the loop watches (`loop.add_reader`); so the reader thread, which must
//!   never wait for the GIL, can cancel a task.
//! * **Replies** are built on the loop thread, under the GIL, by the task's done-callback, with
//!   the same code and shapes as a synchronous call (`exec::finish`), and only queued
//!   (`Outbox::send`): nothing attached to Python writes to the pipe.
//! * **Cancellation** (`{cancel, Id}`: the caller timed out or died) cancels the task, so
//!   `CancelledError` is raised at its `await` and its `finally` blocks run. Its reply is then
//!   always `cancelled`, even if the coroutine swallowed the cancellation and returned.
//!   A cancel can arrive while the worker still runs the call that will return the coroutine;
//!   it is kept (`early`) while the pool holds the request, and the task is cancelled as soon
//!   as it is handed over.
//!
//! Lock order: `inbox`, then the pool's tracking lock (through the `in_pool` test of
//! [`Aio::cancel`]). Neither lock is ever held while waiting for the GIL.

use crate::exec::{self, Failure, Frame};
use crate::framing::Outbox;
use crate::protocol::{self, atom};
use crate::python::PYTHON_THREAD_STACK;
use eetf::Term;
use parking_lot::Mutex;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyCFunction;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::thread;

/// What the loop thread is asked to do.
enum Message {
    /// Run `coro` as a task and answer request `id` when it is done; `cancelled`: its cancel
    /// arrived before the hand-off.
    Start { id: u64, coro: Py<PyAny>, cancelled: bool },
    /// The caller of request `id` gave up.
    Cancel(u64),
}

#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
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

    /// Records the cancel of request `id`; returns true when it was queued for the loop (a
    /// live task), which must then be woken. See [`Aio::cancel`].
    fn cancel(&mut self, id: u64, in_pool: impl Fn(u64) -> bool) -> bool {
        if self.live.contains(&id) {
            self.messages.push(Message::Cancel(id));
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

    /// Request `id` was answered; returns whether it was live.
    fn answered(&mut self, id: u64) -> bool {
        self.live.remove(&id)
    }
}

/// A task on the loop, as the loop thread tracks it.
struct Task {
    task: Py<PyAny>,
    /// Its caller gave up: the reply is `cancelled`, whatever the coroutine returns.
    cancel_requested: bool,
}

pub struct Aio {
    out: Outbox,
    inbox: Mutex<Inbox>,
    /// Touched only by the loop thread.
    tasks: Mutex<HashMap<u64, Task>>,
    /// Requests handed over and not answered yet (`async_tasks` in stats).
    running: AtomicUsize,
    /// The loop watches `wake_rx`; a byte written to `wake_tx` makes it read the inbox.
    wake_rx: OwnedFd,
    wake_tx: OwnedFd,
    started: Once,
}

impl Aio {
    /// Creates the inbox and the wake-up pipe; the loop thread starts on the first hand-off.
    pub fn new(out: Outbox) -> std::io::Result<Arc<Aio>> {
        let (wake_rx, wake_tx) = nonblocking_pipe()?;
        Ok(Arc::new(Aio {
            out,
            inbox: Mutex::new(Inbox::default()),
            tasks: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            wake_rx,
            wake_tx,
            started: Once::new(),
        }))
    }

    /// Requests handed over to the loop and not answered yet.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Hands the coroutine that request `id` returned to the loop. Called by a worker while the
    /// pool still counts the request as running. Returns the reply to send now if the loop
    /// cannot take it (it failed to start), else None: the loop answers when the task is done.
    pub fn hand_off(self: &Arc<Self>, py: Python<'_>, id: u64, coro: Py<PyAny>) -> Option<Frame> {
        self.start_loop_once();
        let mut inbox = self.inbox.lock();
        let cancelled = match inbox.admit(id) {
            Ok(cancelled) => cancelled,
            Err(reason) => {
                drop(inbox);
                // Never awaited: closing it spares a "coroutine was never awaited" warning.
                let _ = coro.bind(py).call_method0("close");
                return Some(protocol::error_frame(Some(id), reason));
            }
        };
        inbox.messages.push(Message::Start { id, coro, cancelled });
        self.running.fetch_add(1, Ordering::AcqRel);
        drop(inbox);
        self.wake();
        None
    }

    /// `{cancel, Id}`, from the reader thread: never waits for the GIL. `in_pool(id)` tells
    /// whether the pool still holds request `id` (queued or running): such a request may yet
    /// return a coroutine, so its cancel is kept until it is handed over or done.
    pub fn cancel(&self, id: u64, in_pool: impl Fn(u64) -> bool) {
        let queued = self.inbox.lock().cancel(id, in_pool);
        if queued {
            self.wake();
        }
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
            let me = self.clone();
            let spawned = thread::Builder::new()
                .name("pyport-asyncio".into())
                .stack_size(PYTHON_THREAD_STACK)
                .spawn(move || me.loop_thread());
            if let Err(e) = spawned {
                let msg = format!("cannot start the asyncio event loop thread: {e}");
                self.inbox.lock().broken = Some(internal_error(&msg));
            }
        });
    }

    fn loop_thread(self: Arc<Self>) {
        Python::attach(|py| {
            let err = match self.run_loop(py) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            let reason = exec::python_error(py, &err);
            let msg = format!("the asyncio event loop stopped; async calls now fail: {}", describe(py, &err));
            self.out.log("error", "pyport", msg.as_bytes());
            self.fail_all(py, reason);
        });
    }

    /// Creates the loop, has it watch the wake-up pipe and runs it. Returns only on failure.
    fn run_loop(self: &Arc<Self>, py: Python<'_>) -> PyResult<std::convert::Infallible> {
        let asyncio = py.import("asyncio")?;
        let event_loop = asyncio.call_method0("new_event_loop")?;
        asyncio.call_method1("set_event_loop", (&event_loop,))?;
        let me = self.clone();
        let lp = event_loop.clone().unbind();
        let drain = PyCFunction::new_closure(py, Some(c"pyport_async_inbox"), None, move |args, _kwargs| {
            let py = args.py();
            me.drain(py, lp.bind(py));
        })?;
        event_loop.call_method1("add_reader", (self.wake_rx.as_raw_fd(), drain))?;
        // Hand-offs queued before the loop watched the pipe left their byte in it.
        loop {
            // Python code may stop the loop (`loop.stop()`): it simply runs on. A coroutine's
            // SystemExit or KeyboardInterrupt comes out of run_forever after asyncio has made
            // it its task's exception (which answers that request): the loop runs on too.
            let stopped = event_loop.call_method0("run_forever").err();
            if event_loop.call_method0("is_closed")?.is_truthy()? {
                return Err(stopped.unwrap_or_else(|| PyRuntimeError::new_err("the event loop was closed")));
            }
        }
    }

    /// The loop's reader callback: does what the inbox asks.
    fn drain(self: &Arc<Self>, py: Python<'_>, event_loop: &Bound<'_, PyAny>) {
        // Emptied first: a wake-up written after this belongs to messages taken later.
        self.clear_wake();
        let messages = std::mem::take(&mut self.inbox.lock().messages);
        for m in messages {
            match m {
                Message::Start { id, coro, cancelled } => self.start_task(py, event_loop, id, coro, cancelled),
                Message::Cancel(id) => self.cancel_task(py, id),
            }
        }
    }

    fn start_task(self: &Arc<Self>, py: Python<'_>, event_loop: &Bound<'_, PyAny>, id: u64, coro: Py<PyAny>, cancelled: bool) {
        let coro = coro.into_bound(py);
        let task = match self.create_task(py, event_loop, id, &coro) {
            Ok(t) => t,
            Err(e) => {
                let _ = coro.call_method0("close");
                return self.answer(id, exec::finish(py, id, Err(Failure::Python(e))));
            }
        };
        if cancelled {
            // Its body never starts; the reply is `cancelled`.
            let _ = task.call_method0("cancel");
        }
        self.tasks.lock().insert(id, Task { task: task.unbind(), cancel_requested: cancelled });
    }

    /// `loop.create_task(coro)`, with a done-callback that answers request `id`.
    fn create_task<'py>(
        self: &Arc<Self>,
        py: Python<'py>,
        event_loop: &Bound<'py, PyAny>,
        id: u64,
        coro: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let task = event_loop.call_method1("create_task", (coro,))?;
        let me = self.clone();
        let done = PyCFunction::new_closure(py, Some(c"pyport_async_done"), None, move |args, _kwargs| -> PyResult<()> {
            me.task_done(args.py(), id, &args.get_item(0)?);
            Ok(())
        })?;
        task.call_method1("add_done_callback", (done,))?;
        Ok(task)
    }

    fn cancel_task(&self, py: Python<'_>, id: u64) {
        let mut tasks = self.tasks.lock();
        let Some(t) = tasks.get_mut(&id) else { return };
        t.cancel_requested = true;
        let task = t.task.clone_ref(py);
        drop(tasks);
        // Only schedules the CancelledError; no Python code of the task runs here.
        let _ = task.bind(py).call_method0("cancel");
    }

    /// The done-callback of request `id`'s task: its reply, shaped as a synchronous call's.
    fn task_done(&self, py: Python<'_>, id: u64, task: &Bound<'_, PyAny>) {
        let requested = self.tasks.lock().remove(&id).is_some_and(|t| t.cancel_requested);
        let cancelled = requested || task.call_method0("cancelled").and_then(|c| c.is_truthy()).unwrap_or(true);
        let frame = if cancelled {
            protocol::error_frame(Some(id), atom("cancelled"))
        } else {
            exec::finish(py, id, task_outcome(task))
        };
        self.answer(id, frame);
    }

    /// Queues the reply of request `id` (only queues: the caller is attached to Python).
    fn answer(&self, id: u64, frame: Frame) {
        if self.inbox.lock().answered(id) {
            self.running.fetch_sub(1, Ordering::AcqRel);
        }
        self.out.send(frame);
    }

    /// The loop died: answers every queued and running request with `reason`, and every later
    /// hand-off too.
    fn fail_all(&self, py: Python<'_>, reason: Term) {
        let messages = {
            let mut inbox = self.inbox.lock();
            inbox.broken = Some(reason.clone());
            std::mem::take(&mut inbox.messages)
        };
        for m in messages {
            if let Message::Start { id, coro, .. } = m {
                let _ = coro.bind(py).call_method0("close");
                self.answer(id, protocol::error_frame(Some(id), reason.clone()));
            }
        }
        let running: Vec<u64> = self.tasks.lock().drain().map(|(id, _)| id).collect();
        for id in running {
            self.answer(id, protocol::error_frame(Some(id), reason.clone()));
        }
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

fn internal_error(msg: &str) -> Term {
    protocol::tuple(vec![atom("internal_error"), protocol::binary(msg.as_bytes())])
}

fn describe(py: Python<'_>, e: &PyErr) -> String {
    let ty = e.get_type(py).name().map(|n| n.to_string()).unwrap_or_default();
    format!("{ty}: {}", e.value(py))
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
}
