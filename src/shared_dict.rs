//! Erlang-side SharedDict requests.
//!
//! `new`, `del`, `keys`, `destroy` and `give_away` only touch the registry and are answered
//! by the reader thread without the GIL. `get` and `set` must unpickle or pickle, so they run
//! on a thread of their own (attached once, like a worker) and never wait behind user jobs.

use crate::convert;
use crate::etf;
use crate::exec::{failure_reason, Failure, Frame};
use crate::framing::Outbox;
use crate::pool::{spin_for_job, PYTHON_THREAD_STACK};
use crate::protocol::{self, atom, Handle};
use crate::pymodule::{pickle_dumps, pickle_loads, registry};
use crate::registry::{Destroyed, GiveAwayError};
use crossbeam_channel::{unbounded, Sender};
use pyo3::prelude::*;
use std::thread;

pub enum PickleJob {
    Get { id: u64, handle: Handle, key: Vec<u8> },
    Set { id: u64, handle: Handle, key: Vec<u8>, payload: Vec<u8> },
}

fn destroyed(id: u64) -> Frame {
    protocol::error_frame(Some(id), atom("shared_dict_destroyed"))
}

fn ok_atom(id: u64) -> Frame {
    protocol::ok_frame(id, |out| etf::put_atom(out, "ok"))
}

pub fn new(id: u64, owner: protocol::Owner) -> Frame {
    let dict = registry().create(owner);
    let handle = dict.handle();
    protocol::ok_frame(id, |out| {
        etf::put_tuple_header(out, 4);
        etf::put_atom(out, protocol::HANDLE_TAG);
        etf::put_u64(out, handle.generation);
        etf::put_u64(out, handle.id);
        etf::put_binary(out, &handle.token);
    })
}

pub fn del(id: u64, handle: &Handle, key: &[u8]) -> Frame {
    match registry().lookup(handle).and_then(|d| d.del(key)) {
        Ok(_) => ok_atom(id),
        Err(Destroyed) => destroyed(id),
    }
}

pub fn keys(id: u64, handle: &Handle) -> Frame {
    match registry().lookup(handle).and_then(|d| d.keys()) {
        Ok(keys) => protocol::ok_frame(id, |out| etf::put_binary_list(out, keys.iter().map(Vec::as_slice))),
        Err(Destroyed) => destroyed(id),
    }
}

pub fn destroy(id: u64, handle: &Handle) -> Frame {
    registry().destroy(handle);
    ok_atom(id)
}

pub fn give_away(id: u64, handle: &Handle, owner: protocol::Owner, caller: Option<&protocol::Owner>) -> Frame {
    match registry().give_away(handle, owner, caller) {
        Ok(()) => ok_atom(id),
        Err(GiveAwayError::Destroyed) => destroyed(id),
        Err(GiveAwayError::NotOwner) => protocol::error_frame(Some(id), protocol::atom("not_owner")),
    }
}

/// Starts the thread that serves `get`/`set` and returns its queue.
pub fn start_pickler(out: Outbox) -> std::io::Result<Sender<PickleJob>> {
    let (tx, rx) = unbounded::<PickleJob>();
    thread::Builder::new().name("pyport-shared-dict".into()).stack_size(PYTHON_THREAD_STACK).spawn(move || {
        Python::attach(|py| {
            let mut reply: Option<Frame> = None;
            loop {
                let job = py.detach(|| {
                    // Written here, detached, as the pool's workers do.
                    if let Some(frame) = reply.take() {
                        if rx.is_empty() {
                            out.send_now(frame);
                        } else {
                            out.send(frame);
                        }
                    }
                    spin_for_job(&rx).or_else(|| rx.recv().ok())
                });
                let Some(job) = job else { break };
                reply = Some(match job {
                    PickleJob::Get { id, handle, key } => get(py, id, &handle, &key),
                    PickleJob::Set { id, handle, key, payload } => set(py, id, &handle, &key, &payload),
                });
            }
        })
    })?;
    Ok(tx)
}

fn get(py: Python<'_>, id: u64, handle: &Handle, key: &[u8]) -> Frame {
    let value = match registry().lookup(handle).and_then(|d| d.get(key)) {
        Err(Destroyed) => return destroyed(id),
        Ok(None) => return protocol::ok_frame(id, |out| etf::put_atom(out, "not_found")),
        Ok(Some(v)) => v,
    };
    let failure = match pickle_loads(py, &value) {
        Ok(obj) => {
            let (mut out, len_at) = protocol::begin_ok_frame(id, value.len() + 16);
            out.push(etf::VERSION);
            etf::put_tuple_header(&mut out, 2);
            etf::put_atom(&mut out, "found");
            match convert::encode(&obj, &mut out) {
                Ok(()) => {
                    protocol::finish_ok_frame(&mut out, len_at);
                    return out;
                }
                Err(e) => Failure::Convert(e),
            }
        }
        Err(e) => Failure::Python(e),
    };
    protocol::error_frame(Some(id), failure_reason(py, failure))
}

fn set(py: Python<'_>, id: u64, handle: &Handle, key: &[u8], payload: &[u8]) -> Frame {
    // Check first so that a dead dict is reported as such, not as a conversion error.
    let dict = match registry().lookup(handle) {
        Ok(d) => d,
        Err(Destroyed) => return destroyed(id),
    };
    let pickled = convert::decode(py, payload)
        .map_err(Failure::Convert)
        .and_then(|obj| pickle_dumps(&obj).map_err(Failure::Python));
    match pickled {
        Ok(v) => match dict.set(key, v) {
            Ok(()) => ok_atom(id),
            Err(Destroyed) => destroyed(id),
        },
        Err(f) => protocol::error_frame(Some(id), failure_reason(py, f)),
    }
}
