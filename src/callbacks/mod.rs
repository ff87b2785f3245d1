//! Python talking back to Erlang: `erlang.call` (and `erlang.async_call`, see `future`),
//! `erlang.send` (see `send`), `erlang.self`, `erlang.whereis`, `erlang.sleep`, and the
//! registered names as attributes of the module (the Python half is `erlang.py`).
//!
//! A callback is a frame `{pyport_callback, Id, Name, Args, Caller}`. The Erlang side runs the
//! function registered under `Name` in a process of its own and answers with a
//! `callback_reply` request, which the reader thread hands to the Python thread waiting for it.
//! That thread waits without the GIL. While it waits, the requests that the callback's Erlang
//! process makes (a `py:call` inside the registered function carries the callback's id as its
//! chain) run on this very thread: a chain Python → Erlang → Python → … nests on one thread,
//! so it needs no new threads and cannot deadlock on a pool of one worker.
//!
//! A worker waits as long as its request lives: when the request is cancelled (its caller
//! timed out or died) the wait ends with `CallCancelled`. Any other thread (one Python code
//! started) waits at most `callback_timeout`. Either way, the Erlang process of a callback
//! nobody waits for any more is killed (`{pyport_callback_cancel, Id}`).

mod future;
mod send;

use crate::convert::{self, ConvertError};
use crate::etf;
use crate::framing::Outbox;
use crate::pool::{Job, Pool};
use crate::protocol::{self, Owner};
use crate::pymodule::{CallCancelled, OpaqueTerm};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often a waiting worker looks whether its request was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(10);

/// Names the Erlang side answers itself (no registered function can start with `$`).
const WHEREIS: &str = "$pyport_whereis";
const CONNECTED: &str = "$pyport_connected";

/// Who waits for the answer to a callback.
enum Waiter {
    /// A thread, blocked until it comes (see `Callbacks::wait`).
    Thread(Sender<Event>),
    /// A future of `erlang.async_call`, settled on its event loop (see `future`).
    Future(future::Pending),
}

/// What a thread waiting for a callback can receive.
pub enum Event {
    Reply { ok: bool, payload: Vec<u8> },
    /// A request of the callback's chain, to run on the waiting thread.
    Nested(Job),
}

pub struct Callbacks {
    out: Outbox,
    undelivered: send::Undelivered,
    /// Settles the futures of `erlang.async_call` (started on first use).
    resolver: OnceLock<Sender<future::Settle>>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    timeout: Duration,
    /// The node this port serves, as an atom's text: pids of other nodes need a check.
    node: String,
    /// Where chain requests go that arrive after their callback was answered.
    pool: OnceLock<Arc<Pool>>,
}

static HOST: OnceLock<Arc<Callbacks>> = OnceLock::new();

impl Callbacks {
    /// Sets up callbacks for this port (once).
    pub fn install(out: Outbox, timeout: Duration, node: String) -> Arc<Callbacks> {
        HOST.get_or_init(|| {
            Arc::new(Callbacks {
                out,
                undelivered: send::Undelivered::default(),
                resolver: OnceLock::new(),
                waiters: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                timeout,
                node,
                pool: OnceLock::new(),
            })
        })
        .clone()
    }

    /// The pool that runs chain requests nobody waits for any more.
    pub fn set_pool(&self, pool: Arc<Pool>) {
        let _ = self.pool.set(pool);
    }

    /// Hands Erlang's answer to whoever waits for callback `id`, if anyone still does.
    pub fn reply(&self, id: u64, ok: bool, payload: Vec<u8>) {
        let mut waiters = self.waiters.lock();
        match waiters.get(&id) {
            Some(Waiter::Thread(tx)) => {
                let _ = tx.send(Event::Reply { ok, payload });
            }
            Some(Waiter::Future(_)) => {
                if let Some(Waiter::Future(pending)) = waiters.remove(&id) {
                    drop(waiters);
                    self.settle(pending, ok, payload);
                }
            }
            None => {}
        }
    }

    /// A request made by the Erlang process of callback `chain`: it runs on the thread that
    /// waits for that callback. Returned when no thread waits (the pool runs it).
    pub fn nested(&self, chain: u64, job: Job) -> Option<Job> {
        let waiters = self.waiters.lock();
        match waiters.get(&chain) {
            Some(Waiter::Thread(tx)) => match tx.send(Event::Nested(job)) {
                Ok(()) => None,
                Err(e) => match e.into_inner() {
                    Event::Nested(job) => Some(job),
                    Event::Reply { .. } => None,
                },
            },
            Some(Waiter::Future(_)) | None => Some(job),
        }
    }

    /// Calls the Erlang function registered as `name` with `args` and waits for its result.
    fn call(&self, py: Python<'_>, name: &[u8], args: &Bound<'_, PyList>) -> PyResult<Py<PyAny>> {
        let mut payload = vec![etf::VERSION];
        convert::encode(args.as_any(), &mut payload).map_err(ConvertError::into_pyerr)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let caller = crate::pylog::current_caller(py);
        let frame = fits(protocol::callback_frame(id, name, &payload, caller.as_ref()), "erlang.call arguments")?;
        let (tx, rx) = unbounded();
        self.waiters.lock().insert(id, Waiter::Thread(tx));
        self.out.send(frame);
        // Nobody may be reading while this thread runs (see `pool::Turn`): the answer must
        // be read.
        if let Some(pool) = self.pool.get() {
            pool.before_waiting();
        }
        // On the event loop's thread, the loop goes on without it while it waits.
        let loop_wait = crate::aio::begin_wait(py);
        let answer = self.wait(py, id, &rx, loop_wait.as_ref(), true);
        if let Some(w) = loop_wait {
            w.end(py);
        }
        self.waiters.lock().remove(&id);
        // Requests of the chain that arrived after the answer run in the pool instead.
        for ev in rx.try_iter() {
            if let (Event::Nested(job), Some(pool)) = (ev, self.pool.get()) {
                pool.submit(job);
            }
        }
        let (ok, payload) = answer?;
        if ok {
            Ok(convert::decode(py, &payload).map_err(ConvertError::into_pyerr)?.unbind())
        } else {
            Err(erlang_error(py, &payload))
        }
    }

    /// Tells the VM to forget what it caches of a dict's key (or of the whole dict), and waits
    /// for its answer as for a callback's (the same cancellation and time limits): a change
    /// to a SharedDict waits for this before anyone can see it (see `shm`).
    pub fn forget(&self, py: Python<'_>, handle: &protocol::Handle, key: Option<&[u8]>) -> PyResult<()> {
        let (id, rx) = self.ask_to_forget(handle, key);
        if let Some(pool) = self.pool.get() {
            pool.before_waiting();
        }
        let loop_wait = crate::aio::begin_wait(py);
        let answer = self.wait(py, id, &rx, loop_wait.as_ref(), false);
        if let Some(w) = loop_wait {
            w.end(py);
        }
        self.waiters.lock().remove(&id);
        answer.map(|_| ())
    }

    /// [`Callbacks::forget`] for a thread that has no Python to run and must not wait for
    /// the GIL (the Erlang side's whole-dict changes): waits at most `callback_timeout`,
    /// without Python. False if the VM did not answer in time.
    pub fn forget_detached(&self, handle: &protocol::Handle, key: Option<&[u8]>) -> bool {
        let (id, rx) = self.ask_to_forget(handle, key);
        let deadline = Instant::now() + self.timeout;
        let answered = loop {
            match rx.recv_deadline(deadline) {
                Ok(Event::Reply { .. }) => break true,
                // An invalidation has no chain; a request sent as one runs in the pool.
                Ok(Event::Nested(job)) => {
                    if let Some(pool) = self.pool.get() {
                        pool.submit(job);
                    }
                }
                Err(_) => break false,
            }
        };
        self.waiters.lock().remove(&id);
        answered
    }

    /// Sends the VM an invalidation and registers the thread that will wait for its answer.
    fn ask_to_forget(&self, handle: &protocol::Handle, key: Option<&[u8]>) -> (u64, Receiver<Event>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        self.waiters.lock().insert(id, Waiter::Thread(tx));
        self.out.send(protocol::sd_invalidate_frame(id, handle, key));
        (id, rx)
    }

    /// Waits for the answer to callback `id`. A worker waits as long as its request lives,
    /// and so does a coroutine (`in_loop`, its task's cancellation ends the wait); any other
    /// thread at most `callback_timeout`.
    /// `callback`: the Erlang process of a callback nobody waits for any more is killed
    /// (an invalidation has none).
    fn wait(&self, py: Python<'_>, id: u64, rx: &Receiver<Event>, in_loop: Option<&crate::aio::LoopWait>, callback: bool) -> PyResult<(bool, Vec<u8>)> {
        let deadline = match (crate::cancel::current_cancelled(), in_loop) {
            (Some(_), _) => None,
            (None, Some(w)) if w.in_task() => None,
            _ => Some(Instant::now() + self.timeout),
        };
        loop {
            // The answer of a quick Erlang function comes within tens of microseconds; a
            // thread that went to sleep by then costs a wake-up, often the largest cost of
            // the round trip. So poll briefly first, without the GIL.
            let event = py.detach(|| match crate::spin::spin_for_job(rx) {
                Some(ev) => Ok(ev),
                None => rx.recv_timeout(CANCEL_POLL),
            });
            match event {
                Ok(Event::Reply { ok, payload }) => {
                    // A cancellation that arrived with the answer still ends the request.
                    self.check_cancelled(py, id, in_loop, callback)?;
                    return Ok((ok, payload));
                }
                Ok(Event::Nested(job)) => {
                    if let Some(frame) = self.pool.get().and_then(|p| p.run_nested(py, job)) {
                        self.out.send(frame);
                    }
                    self.check_cancelled(py, id, in_loop, callback)?;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.check_cancelled(py, id, in_loop, callback)?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        if callback {
                            self.out.send(protocol::callback_cancel_frame(id));
                        }
                        return Err(PyTimeoutError::new_err(format!(
                            "no answer from Erlang within callback_timeout ({} ms)",
                            self.timeout.as_millis()
                        )));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(PyRuntimeError::new_err("callback lost"));
                }
            }
        }
    }

    /// Ends the wait with `CallCancelled` if the worker's request was cancelled meanwhile
    /// (taking back the asynchronous one, so that it does not strike a second time), or
    /// with `CancelledError` if the coroutine's task was.
    fn check_cancelled(&self, py: Python<'_>, id: u64, in_loop: Option<&crate::aio::LoopWait>, callback: bool) -> PyResult<()> {
        let cancelled = cancellation(py, in_loop, "the Erlang caller gave up while Python waited for a callback");
        if cancelled.is_some() && callback {
            self.out.send(protocol::callback_cancel_frame(id));
        }
        cancelled.map_or(Ok(()), Err)
    }

}

/// The exception that ends a wait whose caller gave up: `CallCancelled` for a request (the
/// asynchronous one is taken back, so that it does not strike a second time), or
/// `CancelledError` for a coroutine's task.
fn cancellation(py: Python<'_>, in_loop: Option<&crate::aio::LoopWait>, why: &str) -> Option<PyErr> {
    if crate::cancel::current_cancelled() == Some(true) {
        crate::cancel::take_current_cancel(py);
        return Some(CallCancelled::new_err(why.to_string()));
    }
    if in_loop.is_some_and(|w| w.cancelled()) {
        let err = py
            .import("asyncio")
            .and_then(|m| m.getattr("CancelledError"))
            .and_then(|c| c.call1((why,)))
            .map_or_else(|e| e, PyErr::from_value);
        return Some(err);
    }
    None
}

/// A frame to Erlang within `--max-reply-bytes`, or the ValueError saying it is not.
fn fits(frame: Vec<u8>, what: &str) -> PyResult<Vec<u8>> {
    let max = protocol::max_reply();
    if frame.len() > max {
        return Err(PyValueError::new_err(format!("{what}: {} bytes, over max_reply_bytes ({max})", frame.len())));
    }
    Ok(frame)
}

/// The Python exception for an error answer: `{unknown_function, Name}` or
/// `{Class, Reason, Stack}` (texts).
fn erlang_error(py: Python<'_>, payload: &[u8]) -> PyErr {
    let parsed = convert::decode(py, payload).ok().and_then(|t| t.cast_into::<PyTuple>().ok());
    let module = match py.import("erlang") {
        Ok(m) => m,
        Err(e) => return e,
    };
    let make = |class: &str, args: Bound<'_, PyTuple>| match module.getattr(class).and_then(|c| c.call1(args)) {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    };
    match parsed {
        Some(t) if t.len() == 2 => make("UnknownFunction", t.get_slice(1, 2)),
        Some(t) if t.len() == 3 => make("ErlangError", t),
        _ => PyRuntimeError::new_err("erlang.call: a malformed error answer"),
    }
}

fn host() -> PyResult<&'static Arc<Callbacks>> {
    HOST.get().ok_or_else(|| PyRuntimeError::new_err("callbacks are not available in this process"))
}

fn name_bytes(name: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = name.cast::<PyString>() {
        Ok(s.to_str()?.as_bytes().to_vec())
    } else if let Ok(b) = name.cast::<PyBytes>() {
        Ok(b.as_bytes().to_vec())
    } else {
        Err(PyTypeError::new_err("erlang.call: the function name must be a str"))
    }
}

/// `erlang.call(name, *args)`: runs the Erlang function registered as `name`.
#[pyfunction]
#[pyo3(signature = (name, *args))]
fn call(py: Python<'_>, name: &Bound<'_, PyAny>, args: &Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
    let name = name_bytes(name)?;
    if name.first() == Some(&b'$') {
        return Err(PyValueError::new_err("erlang.call: names starting with $ are reserved"));
    }
    host()?.call(py, &name, &PyList::new(py, args.iter())?)
}

/// `erlang._builtin(name, *args)`: a question only the Erlang side can answer (names
/// starting with `$`, which no registered function has).
#[pyfunction]
#[pyo3(signature = (name, *args))]
fn _builtin(py: Python<'_>, name: &str, args: &Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
    if !name.starts_with('$') {
        return Err(PyValueError::new_err("erlang._builtin: not a built-in name"));
    }
    host()?.call(py, name.as_bytes(), &PyList::new(py, args.iter())?)
}

/// The names of the Erlang functions registered now (`{functions, Names}` from Erlang).
static REGISTERED: parking_lot::RwLock<Vec<String>> = parking_lot::RwLock::new(Vec::new());

/// Replaces the names of the registered Erlang functions (all of them, in each frame).
pub fn set_registered(names: Vec<String>) {
    *REGISTERED.write() = names;
}

#[pyfunction]
fn _is_registered(name: &str) -> bool {
    REGISTERED.read().iter().any(|n| n == name)
}

#[pyfunction]
fn _registered_names() -> Vec<String> {
    REGISTERED.read().clone()
}


/// `erlang.self()`: the pid of the Erlang process whose call this thread runs.
#[pyfunction(name = "self")]
fn self_pid(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let Some(owner) = crate::pylog::current_caller(py) else {
        let no_caller = py.import("erlang")?.getattr("NoCaller")?;
        return Err(PyErr::from_value(no_caller.call1(("erlang.self(): this thread runs no Erlang call",))?));
    };
    opaque_pid(py, &owner)
}

fn opaque_pid(py: Python<'_>, owner: &Owner) -> PyResult<Py<PyAny>> {
    let bytes = protocol::term_body(&eetf::Term::Pid(owner.clone()));
    let term = OpaqueTerm::new_checked(&bytes).ok_or_else(|| PyRuntimeError::new_err("bad pid"))?;
    Ok(Bound::new(py, term)?.into_any().unbind())
}

/// `erlang.whereis(name)`: the pid registered as `name`, or None.
#[pyfunction]
fn whereis(py: Python<'_>, name: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let name = PyString::new(py, &String::from_utf8_lossy(&name_bytes(name)?));
    host()?.call(py, WHEREIS.as_bytes(), &PyList::new(py, [name])?)
}


/// Adds `call`, `send`, `self`, `whereis` and the exceptions to the `erlang` module.
pub fn register(py: Python<'_>) -> PyResult<()> {
    const ERLANG_PY: &str = include_str!("erlang.py");
    let m = py.import("erlang")?;
    m.add_function(wrap_pyfunction!(call, &m)?)?;
    m.add_function(wrap_pyfunction!(send::send_message, &m)?)?;
    m.add_function(wrap_pyfunction!(self_pid, &m)?)?;
    m.add_function(wrap_pyfunction!(whereis, &m)?)?;
    m.add_function(wrap_pyfunction!(_builtin, &m)?)?;
    m.add_function(wrap_pyfunction!(_is_registered, &m)?)?;
    m.add_function(wrap_pyfunction!(_registered_names, &m)?)?;
    m.add_function(wrap_pyfunction!(future::async_call, &m)?)?;
    m.add_function(wrap_pyfunction!(future::_sleep, &m)?)?;
    let code = std::ffi::CString::new(ERLANG_PY).map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.run(&code, Some(&m.dict()), None)
}
