//! `erlang.async_call`: a callback into Erlang as an asyncio future, so that many can be in
//! flight on one event loop (`asyncio.gather`); and `erlang.sleep`'s blocking form, which its
//! caller's cancellation interrupts.
//!
//! The answer arrives on the reader thread, which never waits for the GIL: it hands the answer
//! to a resolver thread, which converts it under the GIL and settles the future on the future's
//! own loop (`call_soon_threadsafe`): whatever loop it is (the port's, or one a request runs
//! with `asyncio.run`). Cancelling the future (its task's caller gave up) tells the Erlang side,
//! which kills the callback's process.

use super::{erlang_error, fits, host, name_bytes, Callbacks, Waiter, CANCEL_POLL};
use crate::convert::{self, ConvertError};
use crate::etf;
use crate::protocol;
use crate::pymodule::CallCancelled;
use crossbeam_channel::{unbounded, Receiver};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyList, PyTuple};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A future waiting for a callback's answer, and its loop.
pub(super) struct Pending {
    event_loop: Py<PyAny>,
    future: Py<PyAny>,
}

/// An answer for the resolver to settle.
pub(super) struct Settle {
    pending: Pending,
    ok: bool,
    payload: Vec<u8>,
}

impl Callbacks {
    /// `erlang.async_call(name, *args)`: sends the callback and returns a future of the
    /// running loop (RuntimeError without one).
    fn async_call(&'static self, py: Python<'_>, name: &[u8], args: &Bound<'_, PyList>) -> PyResult<Py<PyAny>> {
        let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
        let future = event_loop.call_method0("create_future")?;
        let mut payload = vec![etf::VERSION];
        convert::encode(args.as_any(), &mut payload).map_err(ConvertError::into_pyerr)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let caller = crate::pylog::current_caller(py);
        let frame = fits(protocol::callback_frame(id, name, &payload, caller.as_ref()), "erlang.async_call arguments")?;
        self.resolver(py)?;
        // A future cancelled before its answer (its task's caller gave up) stops waiting,
        // and the Erlang side kills the callback's process.
        let done = PyCFunction::new_closure(py, Some(c"pyport_async_call_done"), None, move |args, _kwargs| -> PyResult<()> {
            let fut = args.get_item(0)?;
            if fut.call_method0("cancelled")?.is_truthy()? && self.waiters.lock().remove(&id).is_some() {
                self.out.send(protocol::callback_cancel_frame(id));
            }
            Ok(())
        })?;
        future.call_method1("add_done_callback", (done,))?;
        let pending = Pending { event_loop: event_loop.unbind(), future: future.clone().unbind() };
        self.waiters.lock().insert(id, Waiter::Future(pending));
        self.out.send(frame);
        // Somebody must read the answer (see `pool::Turn`).
        if let Some(pool) = self.pool.get() {
            pool.before_waiting();
        }
        Ok(future.unbind())
    }

    /// The answer to an `erlang.async_call` came (on the reader thread): the resolver
    /// settles its future.
    pub(super) fn settle(&self, pending: Pending, ok: bool, payload: Vec<u8>) {
        if let Some(tx) = self.resolver.get() {
            let _ = tx.send(Settle { pending, ok, payload });
        }
    }

    /// The resolver thread, started on the first `erlang.async_call`.
    fn resolver(&'static self, _py: Python<'_>) -> PyResult<()> {
        if self.resolver.get().is_some() {
            return Ok(());
        }
        let (tx, rx) = unbounded();
        if self.resolver.set(tx).is_ok() {
            std::thread::Builder::new()
                .name("pyport-async-calls".into())
                .stack_size(crate::python::PYTHON_THREAD_STACK)
                .spawn(move || resolve_loop(rx))
                .map_err(|e| PyValueError::new_err(format!("cannot start the async_call resolver: {e}")))?;
        }
        Ok(())
    }
}

/// Converts each answer and settles its future on its loop. A loop that is closed by then
/// has nobody to tell.
fn resolve_loop(rx: Receiver<Settle>) {
    Python::attach(|py| {
        let Ok(erlang) = py.import("erlang") else { return };
        let Ok(settle) = erlang.getattr("_settle") else { return };
        while let Ok(s) = py.detach(|| rx.recv()) {
            let outcome = if s.ok {
                match convert::decode(py, &s.payload) {
                    Ok(v) => (true, v.unbind()),
                    Err(e) => (false, e.into_pyerr().into_value(py).into_any()),
                }
            } else {
                (false, erlang_error(py, &s.payload).into_value(py).into_any())
            };
            let args = (&settle, s.pending.future.bind(py), outcome.0, outcome.1);
            let _ = s.pending.event_loop.bind(py).call_method1("call_soon_threadsafe", args);
        }
    })
}

/// `erlang.async_call(name, *args)`: an awaitable callback into Erlang.
#[pyfunction]
#[pyo3(signature = (name, *args))]
pub(super) fn async_call(py: Python<'_>, name: &Bound<'_, PyAny>, args: &Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
    let name = name_bytes(name)?;
    if name.first() == Some(&b'$') {
        return Err(PyValueError::new_err("erlang.async_call: names starting with $ are reserved"));
    }
    host()?.async_call(py, &name, &PyList::new(py, args.iter())?)
}

/// `erlang.sleep(seconds)` outside a running event loop: sleeps without the GIL, in slices,
/// so that the caller's cancellation interrupts it (`CallCancelled`) instead of waiting for
/// it, as it would for `time.sleep`.
#[pyfunction]
pub(super) fn _sleep(py: Python<'_>, seconds: f64) -> PyResult<()> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(PyValueError::new_err("sleep length must be a non-negative number"));
    }
    let until = Instant::now() + Duration::from_secs_f64(seconds.min(1e9));
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        py.detach(|| std::thread::sleep(left.min(CANCEL_POLL)));
        if crate::cancel::current_cancelled() == Some(true) {
            crate::cancel::take_current_cancel(py);
            return Err(CallCancelled::new_err("the Erlang caller gave up during erlang.sleep"));
        }
        // Other signals of Python itself (KeyboardInterrupt in the main thread) still count.
        py.check_signals()?;
    }
}
