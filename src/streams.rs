//! Streams: a Python generator or iterator whose items an Erlang process receives as
//! messages, `{py_stream, Ref, {data, V}}`, then `{py_stream, Ref, done}` or
//! `{py_stream, Ref, {error, Reason}}`.
//!
//! The function may also return an async generator (or any async iterator): its items are
//! awaited on an event loop of the stream's own, on the worker that pulls them.
//!
//! Flow control is by credit: a stream starts with `window` credits, each item sent spends
//! one, and each item the owner acknowledges (`stream_ack`) gives one back. A stream out of
//! credit holds no thread: its pulling job ends, and the acknowledgement that gives it credit
//! again queues a new one. So the owner never has more than `window` unacknowledged items in
//! its mailbox, and thousands of idle streams cost no workers.
//!
//! A stream is named by its Erlang reference (its external format). Cancelling it (or its
//! owner's death) closes the generator, so its `finally` clauses run.

use crate::etf;
use crate::exec::{failure_reason, Failure, Frame, Interp};
use crate::framing::Outbox;
use crate::pool::{Job, Pool};
use crate::protocol::{self, Owner};
use parking_lot::Mutex;
use pyo3::exceptions::{PyStopAsyncIteration, PyStopIteration};
use pyo3::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Ids of the port's own jobs: above every request id Erlang uses (1 to 2^63 - 1).
static NEXT_TASK_ID: AtomicU64 = AtomicU64::new(1 << 63);

struct Stream {
    /// The Erlang reference naming the stream, in external format (no version byte).
    key: Vec<u8>,
    /// The owner: where the items go, and whose death cancels the stream.
    owner: Owner,
    owner_pid: Vec<u8>,
    iter: Py<PyAny>,
    /// For an async iterator: the event loop its items are awaited on.
    aloop: Option<Py<PyAny>>,
    state: Mutex<StreamState>,
}

impl Stream {
    /// The next item; `Ok(None)` at the end.
    fn next_item<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let it = self.iter.bind(py);
        let next = match &self.aloop {
            None => it.call_method0(pyo3::intern!(py, "__next__")),
            Some(lp) => {
                let awaitable = it.call_method0(pyo3::intern!(py, "__anext__"))?;
                lp.bind(py).call_method1(pyo3::intern!(py, "run_until_complete"), (awaitable,))
            }
        };
        match next {
            Ok(item) => Ok(Some(item)),
            Err(e) if e.is_instance_of::<PyStopIteration>(py) || e.is_instance_of::<PyStopAsyncIteration>(py) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Closes the generator (its `finally` runs) and the stream's event loop.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let it = self.iter.bind(py);
        let closed = match &self.aloop {
            None if it.hasattr(pyo3::intern!(py, "close"))? => it.call_method0(pyo3::intern!(py, "close")).map(drop),
            None => Ok(()),
            Some(lp) if it.hasattr(pyo3::intern!(py, "aclose"))? => {
                let awaitable = it.call_method0(pyo3::intern!(py, "aclose"))?;
                lp.bind(py).call_method1(pyo3::intern!(py, "run_until_complete"), (awaitable,)).map(drop)
            }
            Some(_) => Ok(()),
        };
        self.close_loop(py);
        closed
    }

    fn close_loop(&self, py: Python<'_>) {
        if let Some(lp) = &self.aloop {
            let _ = lp.bind(py).call_method0(pyo3::intern!(py, "close"));
        }
    }
}

#[derive(Default)]
struct StreamState {
    credit: u64,
    /// A pulling job is queued or running.
    pulling: bool,
    /// Its request id, so that a cancel can interrupt a generator blocked in `next`.
    pull_id: u64,
    /// The pulling job has started (a queued one needs no interrupting: it sees `cancelled`).
    in_next: bool,
    cancelled: bool,
}

/// Why a stream that was starting must not start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Abort {
    /// Its owner died (or was never reachable).
    OwnerDown,
    /// `stream_cancel`.
    Cancelled,
}

/// A stream from its `stream_start` until its function has returned an iterator.
struct Starting {
    owner: Owner,
    abort: Option<Abort>,
}

pub struct Streams {
    out: Outbox,
    interp: Arc<Interp>,
    pool: Arc<Pool>,
    /// Lock order: `table`, then `starting`.
    table: Mutex<HashMap<Vec<u8>, Arc<Stream>>>,
    starting: Mutex<HashMap<Vec<u8>, Starting>>,
}

/// What starts a stream.
pub struct StreamStart {
    pub id: u64,
    /// Whose namespace the function is looked up in (the calling process).
    pub caller: Owner,
    pub module: String,
    pub function: String,
    pub payload: Vec<u8>,
    pub key: Vec<u8>,
    pub owner: Owner,
    pub window: u64,
}

impl Streams {
    pub fn new(out: Outbox, interp: Arc<Interp>, pool: Arc<Pool>) -> Arc<Streams> {
        Arc::new(Streams { out, interp, pool, table: Mutex::new(HashMap::new()), starting: Mutex::new(HashMap::new()) })
    }

    /// Streams open or starting: what the server counts too, from `stream_start` to the
    /// `pyport_stream_end` the port sends for every stream, started or not.
    pub fn count(&self) -> usize {
        let table = self.table.lock();
        table.len() + self.starting.lock().len()
    }

    /// Calls the function on a worker; answers the request `ok` once it returned something
    /// iterable (or the error of a call), then sends the first `window` items. Called on the
    /// reader thread: the stream is known from now on, so that its owner's death or its
    /// cancellation, read next, reaches it even before its function has returned.
    pub fn start(self: &Arc<Self>, s: StreamStart) -> Job {
        self.starting.lock().insert(s.key.clone(), Starting { owner: s.owner.clone(), abort: None });
        let me = self.clone();
        let what = format!("stream {}.{}", s.module, s.function);
        // Dropped with the job, run or not (a start cancelled while queued never runs).
        let guard = StartGuard { streams: self.clone(), key: s.key.clone() };
        Job::Task {
            id: s.id,
            what,
            run: Box::new(move |py| {
                me.begin(py, &s, &guard);
                Frame::new()
            }),
        }
    }

    /// A start that never ran: forgotten, and the server told.
    fn start_abandoned(&self, key: &[u8]) {
        if self.starting.lock().remove(key).is_some() {
            self.out.send(protocol::stream_end_frame(key));
        }
    }

    /// `_guard`: owned by the job (see `start`), so that a job dropped unrun forgets it.
    fn begin(self: &Arc<Self>, py: Python<'_>, s: &StreamStart, _guard: &StartGuard) {
        let _caller = crate::pylog::CallerGuard::set(&s.caller);
        let iter = self.interp.call_function(py, &s.caller, &s.module, &s.function, &s.payload).and_then(|v| {
            if v.hasattr(pyo3::intern!(py, "__anext__"))? {
                let lp = py.import("asyncio")?.call_method0("new_event_loop")?;
                Ok((v.unbind(), Some(lp.unbind())))
            } else {
                Ok((v.try_iter()?.into_any().unbind(), None))
            }
        });
        let (iter, aloop) = match iter {
            Ok(i) => i,
            Err(f) => {
                self.start_abandoned(&s.key);
                return self.out.send(protocol::error_frame(Some(s.id), failure_reason(py, f)));
            }
        };
        let stream = Arc::new(Stream {
            key: s.key.clone(),
            owner: s.owner.clone(),
            owner_pid: protocol::term_body(&eetf::Term::Pid(s.owner.clone())),
            iter,
            aloop,
            state: Mutex::new(StreamState { credit: s.window.max(1), pulling: true, pull_id: s.id, in_next: false, cancelled: false }),
        });
        let abort = {
            let mut table = self.table.lock();
            let abort = self.starting.lock().remove(&s.key).map_or(Some(Abort::Cancelled), |st| st.abort);
            if abort.is_none() {
                table.insert(s.key.clone(), stream.clone());
            }
            abort
        };
        if let Some(abort) = abort {
            // Nobody can receive it: the generator is closed (its finally runs) and the
            // start answered with why.
            self.out.send(protocol::stream_end_frame(&s.key));
            if let Err(e) = stream.close(py) {
                self.out.log("warning", "pyport", format!("closing a stream nobody receives raised: {e}").as_bytes());
            }
            let reason = if abort == Abort::OwnerDown { "owner_down" } else { "cancelled" };
            return self.out.send(protocol::error_frame(Some(s.id), protocol::atom(reason)));
        }
        self.out.send(protocol::ok_frame(s.id, |out| etf::put_atom(out, "ok")));
        self.pull(py, &stream);
    }

    /// Sends items while there is credit; then the job ends and holds nothing.
    fn pull(&self, py: Python<'_>, stream: &Arc<Stream>) {
        let _caller = crate::pylog::CallerGuard::set(&stream.owner);
        loop {
            {
                let mut st = stream.state.lock();
                if st.cancelled {
                    drop(st);
                    return self.close(py, stream);
                }
                if st.credit == 0 {
                    st.pulling = false;
                    st.in_next = false;
                    return;
                }
                st.credit -= 1;
                st.in_next = true;
            }
            let next = stream.next_item(py);
            let cancelled = {
                let mut st = stream.state.lock();
                st.in_next = false;
                st.cancelled
            };
            if cancelled {
                // Interrupted or not, a cancelled stream sends nothing more.
                return self.close(py, stream);
            }
            let message = match next {
                Ok(Some(item)) => {
                    let mut msg = message_start(&stream.key, 2);
                    etf::put_atom(&mut msg, "data");
                    match crate::convert::encode(&item, &mut msg) {
                        Ok(()) => msg,
                        Err(e) => return self.finish(py, stream, Some(Failure::Convert(e))),
                    }
                }
                Ok(None) => return self.finish(py, stream, None),
                Err(e) => return self.finish(py, stream, Some(Failure::Python(e))),
            };
            let frame = protocol::stream_send_frame(&stream.key, &stream.owner_pid, &message);
            let max = protocol::max_reply();
            if frame.len() > max {
                // Sent, it would be dropped on the way out while its credit stays spent.
                let reason = protocol::tuple(vec![protocol::atom("reply_too_large"), protocol::int(frame.len() as u64), protocol::int(max as u64)]);
                return self.finish(py, stream, Some(Failure::Reason(reason)));
            }
            self.out.send(frame);
        }
    }

    /// The generator ended (`None`) or failed: the owner is told, the stream forgotten.
    fn finish(&self, py: Python<'_>, stream: &Stream, failure: Option<Failure>) {
        self.table.lock().remove(&stream.key);
        if failure.is_some() {
            // A generator stopped by an item it could not send is still suspended: its
            // finally runs now, while its event loop (if any) is still open.
            let _ = stream.close(py);
        } else {
            stream.close_loop(py);
        }
        let mut msg = vec![etf::VERSION];
        etf::put_tuple_header(&mut msg, 3);
        etf::put_atom(&mut msg, "py_stream");
        msg.extend_from_slice(&stream.key);
        match failure {
            None => etf::put_atom(&mut msg, "done"),
            Some(f) => {
                etf::put_tuple_header(&mut msg, 2);
                etf::put_atom(&mut msg, "error");
                msg.extend_from_slice(&protocol::term_body(&failure_reason(py, f)));
            }
        }
        // One frame ends the stream and carries its last message: were they two, a port
        // that dies between them would leave the owner with neither `done` nor the error
        // of the port's exit (the server stops tracking a stream at its end).
        self.out.send(protocol::stream_end_frame_with(&stream.key, &stream.owner_pid, &msg));
    }

    /// Closes a cancelled stream's generator (its `finally` runs) and forgets it.
    fn close(&self, py: Python<'_>, stream: &Stream) {
        self.table.lock().remove(&stream.key);
        self.out.send(protocol::stream_end_frame(&stream.key));
        if let Err(e) = stream.close(py) {
            let msg = format!("closing a cancelled stream raised: {e}");
            self.out.log("warning", "pyport", msg.as_bytes());
        }
    }

    /// The owner consumed `n` items: `n` more may be sent.
    pub fn ack(self: &Arc<Self>, key: &[u8], n: u64) {
        let Some(stream) = self.table.lock().get(key).cloned() else { return };
        let resume = {
            let mut st = stream.state.lock();
            st.credit = st.credit.saturating_add(n);
            !std::mem::replace(&mut st.pulling, true)
        };
        if resume {
            self.resume(stream);
        }
    }

    /// Stops a stream: its generator is closed by the next pulling job (or, for a stream
    /// still starting, as soon as its function returns it).
    pub fn cancel(self: &Arc<Self>, key: &[u8]) {
        let stream = {
            let table = self.table.lock();
            if let Some(st) = self.starting.lock().get_mut(key) {
                st.abort.get_or_insert(Abort::Cancelled);
            }
            table.get(key).cloned()
        };
        if let Some(stream) = stream {
            self.cancel_stream(stream);
        }
    }

    fn cancel_stream(self: &Arc<Self>, stream: Arc<Stream>) {
        let (resume, running) = {
            let mut st = stream.state.lock();
            st.cancelled = true;
            let was_pulling = std::mem::replace(&mut st.pulling, true);
            (!was_pulling, (was_pulling && st.in_next).then_some(st.pull_id))
        };
        if resume {
            self.resume(stream);
        } else if let Some(id) = running {
            // A generator blocked in `next` (a queue, a socket, a callback) is interrupted
            // like a cancelled call; the pulling job then closes it.
            self.pool.cancel(id);
        }
    }

    /// The owner died: its streams are cancelled, the ones still starting too.
    pub fn owner_down(self: &Arc<Self>, owner: &Owner) {
        let doomed: Vec<Arc<Stream>> = {
            let table = self.table.lock();
            for st in self.starting.lock().values_mut().filter(|st| &st.owner == owner) {
                st.abort = Some(Abort::OwnerDown);
            }
            table.values().filter(|s| &s.owner == owner).cloned().collect()
        };
        for s in doomed {
            self.cancel_stream(s);
        }
    }

    fn resume(self: &Arc<Self>, stream: Arc<Stream>) {
        let me = self.clone();
        let id = NEXT_TASK_ID.fetch_add(1, Ordering::Relaxed);
        stream.state.lock().pull_id = id;
        self.pool.submit(Job::Task {
            id,
            what: "stream".into(),
            run: Box::new(move |py| {
                me.pull(py, &stream);
                Frame::new()
            }),
        });
    }
}

/// Forgets a start whose job is dropped without having begun (see `Streams::start`).
struct StartGuard {
    streams: Arc<Streams>,
    key: Vec<u8>,
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        self.streams.start_abandoned(&self.key);
    }
}

/// `{py_stream, Ref, {Tag, ...` with the inner tuple's header of `arity` written.
fn message_start(key: &[u8], arity: usize) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.push(etf::VERSION);
    etf::put_tuple_header(&mut msg, 3);
    etf::put_atom(&mut msg, "py_stream");
    msg.extend_from_slice(key);
    etf::put_tuple_header(&mut msg, arity);
    msg
}
