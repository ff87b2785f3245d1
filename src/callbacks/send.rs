//! `erlang.send`: Python's messages to Erlang processes, held back in Python while the VM
//! has too many of them undelivered (it reports deliveries with `{sent, N, Bytes}`).

use super::{cancellation, fits, host, Callbacks, CANCEL_POLL, CONNECTED};
use crate::convert::{self, ConvertError};
use crate::etf;
use crate::protocol;
use crate::pymodule::OpaqueTerm;
use parking_lot::Mutex;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::time::{Duration, Instant};

/// `erlang.send` messages (and their bytes) that the VM may not have delivered yet: beyond
/// either, `erlang.send` waits until the VM reports deliveries (`{sent, N, Bytes}`). So a
/// Python loop that sends faster than the VM delivers is held back in Python, with the
/// VM's queues bounded, and nothing takes a shortcut that would reorder messages.
const MAX_UNDELIVERED: usize = 1024;
const MAX_UNDELIVERED_BYTES: usize = 64 << 20;

/// Messages of `erlang.send` sent to the VM and not yet reported delivered.
#[derive(Default)]
pub(super) struct Undelivered {
    state: Mutex<(usize, usize)>,
    settled: parking_lot::Condvar,
}

impl Undelivered {
    /// Whether one more message of `bytes` may go now (always when nothing is pending, so
    /// that a single message larger than the byte bound still goes).
    fn room_for(state: &(usize, usize), bytes: usize) -> bool {
        let (n, total) = *state;
        n == 0 || (n < MAX_UNDELIVERED && total + bytes <= MAX_UNDELIVERED_BYTES)
    }

    fn try_take(&self, bytes: usize) -> bool {
        let mut st = self.state.lock();
        let room = Self::room_for(&st, bytes);
        if room {
            st.0 += 1;
            st.1 += bytes;
        }
        room
    }

    /// Waits up to `timeout` for room, then counts the message; false if there was none.
    /// Call it detached from Python.
    fn take_within(&self, bytes: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while !Self::room_for(&st, bytes) {
            if self.settled.wait_until(&mut st, deadline).timed_out() && !Self::room_for(&st, bytes) {
                return false;
            }
        }
        st.0 += 1;
        st.1 += bytes;
        true
    }

    fn delivered(&self, delivered: Option<(u64, u64)>) {
        let mut st = self.state.lock();
        *st = match delivered {
            Some((n, bytes)) => (st.0.saturating_sub(n as usize), st.1.saturating_sub(bytes as usize)),
            None => (0, 0),
        };
        self.settled.notify_all();
    }
}

impl Callbacks {
    /// The VM delivered `erlang.send` messages (see `MAX_UNDELIVERED`).
    pub fn sent(&self, delivered: Option<(u64, u64)>) {
        self.undelivered.delivered(delivered);
    }

    fn send(&self, py: Python<'_>, pid: &Bound<'_, PyAny>, message: &Bound<'_, PyAny>) -> PyResult<()> {
        let term = pid.cast::<OpaqueTerm>().map_err(|_| PyTypeError::new_err("erlang.send: the first argument must be a pid"))?;
        let term = term.get();
        if term.kind_str() != "pid" {
            return Err(PyTypeError::new_err(format!("erlang.send: a {} is not a pid", term.kind_str())));
        }
        if pid_node(term.bytes()).is_some_and(|n| n != self.node) && !self.connected(py, pid)? {
            return Err(PyValueError::new_err("erlang.send: the pid's node is not connected"));
        }
        let mut payload = vec![etf::VERSION];
        convert::encode(message, &mut payload).map_err(ConvertError::into_pyerr)?;
        let frame = fits(protocol::send_frame(term.bytes(), &payload), "erlang.send message")?;
        // Held back, without the GIL, while the VM has not delivered enough of what was sent
        // before; on the event loop's thread, the loop goes on meanwhile. A caller that gives
        // up meanwhile ends the wait, as it ends a callback's.
        if !self.undelivered.try_take(payload.len()) {
            let loop_wait = crate::aio::begin_wait(py);
            let taken = loop {
                if py.detach(|| self.undelivered.take_within(payload.len(), CANCEL_POLL)) {
                    break Ok(());
                }
                if let Some(e) = cancellation(py, loop_wait.as_ref(), "the Erlang caller gave up while erlang.send waited") {
                    break Err(e);
                }
            };
            if let Some(w) = loop_wait {
                w.end(py);
            }
            taken?;
        }
        self.out.send(frame);
        Ok(())
    }

    fn connected(&self, py: Python<'_>, pid: &Bound<'_, PyAny>) -> PyResult<bool> {
        let answer = self.call(py, CONNECTED.as_bytes(), &PyList::new(py, [pid])?)?;
        answer.bind(py).is_truthy()
    }
}

/// The node name in a pid's external format (NEW_PID_EXT or PID_EXT: the tag, then the node
/// atom).
fn pid_node(bytes: &[u8]) -> Option<String> {
    let mut r = etf::Reader::new(bytes);
    r.u8().ok()?;
    let tag = r.u8().ok()?;
    let name = r.atom_body(tag).ok()?;
    Some(if matches!(tag, etf::ATOM | etf::SMALL_ATOM) {
        name.iter().map(|&b| b as char).collect()
    } else {
        String::from_utf8(name.to_vec()).ok()?
    })
}


/// `erlang.send(pid, message)`: sends `message` to the Erlang process `pid`, like `!`.
#[pyfunction]
#[pyo3(name = "send")]
pub(super) fn send_message(py: Python<'_>, pid: &Bound<'_, PyAny>, message: &Bound<'_, PyAny>) -> PyResult<()> {
    host()?.send(py, pid, message)
}
