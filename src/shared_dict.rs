//! Erlang-side SharedDict requests.
//!
//! Plain data (the conversion table's types: None, bool, int, float, str, bytes, list, tuple,
//! dict, sets, Erlang pids/refs/ports/funs, SharedDict handles) moves between its stored
//! pickle form and ETF in Rust (`pickle_etf`), right on the reader thread and without the GIL:
//! `get`, `set`, `del`, `keys`, `update_counter` and `compare_and_swap` of such values never
//! wait for Python, however busy it is. What needs Python goes elsewhere:
//! * reading an instance of a user class runs its unpickling code, which may be slow or never
//!   return: it runs on a small pool of decoders with the cancellation and write-off rules of
//!   calls, so it delays only the callers that asked for that value;
//! * storing a term only Python can build (a date, an Elixir struct) or one Python must refuse
//!   with its own error runs on the pickler thread.
//!
//! A plain value served to an Erlang `get` goes out as a `cached` reply: the VM keeps it in its
//! read cache, and the store flags the entry so that a change made in any port first has the
//! VM forget it (see `shm`). The flag is set under the dict's lock, after a check that the
//! entry still holds the value read and that no such change is waiting.
//!
//! Erlang-side key changes run here without waiting for anything: the VM forgot the key
//! before it sent them. Whole-dict changes (a destroy, the dicts of a dead owner) may have to
//! wait for the VM, so they run on a bookkeeping thread of their own, never on the reader
//! (which must read the VM's answer); that thread runs no Python and never takes the GIL, so
//! a Python thread that holds the GIL cannot hold up a destroy or an owner's clean-up.

use crate::convert;
use crate::etf;
use crate::exec::{failure_reason, Failure, Frame, Interp};
use crate::framing::Outbox;
use crate::pickle_etf::{self, Declined, Int};
use crate::pool::{Job, Pool, PoolConfig, PYTHON_THREAD_STACK};
use crate::spin::spin_for_job;
use crate::protocol::{self, atom, Handle};
use crate::pymodule::{counter_update, pickle_dumps, pickle_loads, registry};
use crate::registry::{Dict, Error as StoreError, Stored, Ungated, Update};
use crossbeam_channel::{unbounded, Sender};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::thread;

/// Work for the pickler thread: an Erlang-side `set` whose term needs Python to convert.
pub struct PickleJob {
    id: u64,
    handle: Handle,
    key: Vec<u8>,
    payload: Vec<u8>,
}

/// Sets waiting for the pickler, and those whose caller gave up meanwhile: a set that timed
/// out must not land after the caller's next write (which returned `ok`) and undo it.
#[derive(Default)]
struct PicklerCancels {
    queued: HashSet<u64>,
    cancelled: HashSet<u64>,
}

/// Counters for `stats`.
pub struct SharedDictStats {
    pub python_decodes: u64,
    pub decode_queued: usize,
    pub decode_stuck: usize,
}

/// Serves the Erlang side's SharedDict requests.
pub struct SharedDicts {
    out: Outbox,
    pickler: Sender<PickleJob>,
    pickler_cancels: Arc<Mutex<PicklerCancels>>,
    bookkeeper: Sender<Bookkeeping>,
    /// Started on first use: most ports never read a value that needs Python from Erlang,
    /// and idle Python threads cost address space (a stack and a malloc arena each), which
    /// counts against `max_memory_bytes`.
    decoders: OnceLock<Arc<Pool>>,
    decoder_cfg: PoolConfig,
    interp: Arc<Interp>,
    python_decodes: AtomicU64,
}

fn destroyed(id: u64) -> Frame {
    protocol::error_frame(Some(id), atom("shared_dict_destroyed"))
}

/// The error reply for a store failure: `shared_dict_destroyed`, `shared_dict_full` (the
/// Erlang side raises `{shared_dict_full, SD}`), `not_owner`, or an internal error.
fn store_error(id: u64, e: StoreError) -> Frame {
    match e {
        StoreError::Destroyed => destroyed(id),
        StoreError::Full => protocol::error_frame(Some(id), atom("shared_dict_full")),
        StoreError::NotOwner => protocol::error_frame(Some(id), atom("not_owner")),
        e => protocol::error_frame(
            Some(id),
            protocol::tuple(vec![atom("internal_error"), protocol::binary(format!("SharedDict: {e}").as_bytes())]),
        ),
    }
}

fn ok_atom(id: u64) -> Frame {
    protocol::ok_frame(id, |out| etf::put_atom(out, "ok"))
}

fn put_handle(out: &mut Vec<u8>, handle: &Handle) {
    etf::put_tuple_header(out, 4);
    etf::put_atom(out, protocol::HANDLE_TAG);
    etf::put_u64(out, handle.generation);
    etf::put_u64(out, handle.id);
    etf::put_binary(out, &handle.token);
}

/// `{Id, cached, {Handle, Key, Payload}}`: an Erlang `get`'s reply that the VM may cache.
fn cached_frame(id: u64, handle: &Handle, key: &[u8], payload: &[u8]) -> Frame {
    let mut out = Vec::with_capacity(payload.len() + key.len() + 96);
    out.push(etf::VERSION);
    etf::put_tuple_header(&mut out, 3);
    etf::put_u64(&mut out, id);
    etf::put_atom(&mut out, "cached");
    etf::put_tuple_header(&mut out, 3);
    put_handle(&mut out, handle);
    etf::put_binary(&mut out, key);
    etf::put_binary(&mut out, payload);
    out
}

/// `{Id, ok, Payload}` for a payload that is already a versioned term.
fn payload_frame(id: u64, payload: &[u8]) -> Frame {
    let (mut out, len_at) = protocol::begin_ok_frame(id, payload.len());
    out.extend_from_slice(payload);
    protocol::finish_ok_frame(&mut out, len_at);
    out
}

fn bool_frame(id: u64, b: bool) -> Frame {
    protocol::ok_frame(id, |out| etf::put_atom(out, if b { "true" } else { "false" }))
}

/// The start of a `{found, Value}` payload; the value's body follows.
fn found_payload(capacity: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(capacity + 16);
    payload.push(etf::VERSION);
    etf::put_tuple_header(&mut payload, 2);
    etf::put_atom(&mut payload, "found");
    payload
}

impl SharedDicts {
    /// Starts the pickler thread. The decoder pool (`decoder_cfg`) starts when first needed.
    pub fn start(out: Outbox, decoder_cfg: PoolConfig, interp: Arc<Interp>) -> std::io::Result<Arc<SharedDicts>> {
        let pickler_cancels = Arc::new(Mutex::new(PicklerCancels::default()));
        let pickler = start_pickler(out.clone(), pickler_cancels.clone())?;
        let bookkeeper = start_bookkeeper(out.clone())?;
        Ok(Arc::new(SharedDicts {
            out,
            pickler,
            pickler_cancels,
            bookkeeper,
            decoders: OnceLock::new(),
            decoder_cfg,
            interp,
            python_decodes: AtomicU64::new(0),
        }))
    }

    pub fn stats(&self) -> SharedDictStats {
        let (queued, stuck) = self.decoders.get().map_or((0, 0), |p| {
            let s = p.stats();
            (s.queued, s.abandoned)
        });
        SharedDictStats {
            python_decodes: self.python_decodes.load(Ordering::Relaxed),
            decode_queued: queued,
            decode_stuck: stuck,
        }
    }

    /// A cancelled request may be a decoding one.
    pub fn cancel(&self, id: u64) {
        if let Some(p) = self.decoders.get() {
            p.cancel(id);
        }
        let mut c = self.pickler_cancels.lock();
        if c.queued.remove(&id) {
            c.cancelled.insert(id);
        }
    }

    /// Runs `job` on a decoder thread, starting the pool if need be.
    fn submit_decode(&self, job: Job) {
        let id = job.id();
        let pool = match self.decoders.get() {
            Some(p) => p,
            None => match Pool::start(self.decoder_cfg, self.interp.clone(), self.out.clone(), None, None) {
                // Only the reader thread submits, so no other pool can be started meanwhile.
                Ok(p) => self.decoders.get_or_init(|| p),
                Err(e) => {
                    let reason = protocol::tuple(vec![atom("internal_error"), protocol::binary(format!("cannot start SharedDict decoder threads: {e}").as_bytes())]);
                    return self.out.send(protocol::error_frame(Some(id), reason));
                }
            },
        };
        pool.submit(job);
    }

    fn lookup(&self, id: u64, handle: &Handle) -> Option<Dict> {
        match registry().lookup(handle) {
            Ok(d) => Some(d),
            Err(e) => {
                self.out.send(store_error(id, e));
                None
            }
        }
    }

    pub fn new_dict(&self, id: u64, owner: protocol::Owner) {
        self.out.send(match registry().create(&owner) {
            Ok(dict) => {
                let handle = dict.handle();
                protocol::ok_frame(id, |out| put_handle(out, &handle))
            }
            Err(e) => store_error(id, e),
        });
    }

    pub fn del(&self, id: u64, handle: &Handle, key: &[u8]) {
        self.out.send(match registry().lookup(handle).and_then(|d| d.del(key, &Ungated)) {
            Ok(_) => ok_atom(id),
            Err(e) => store_error(id, e),
        })
    }

    pub fn keys(&self, id: u64, handle: &Handle) {
        self.out.send(match registry().lookup(handle).and_then(|d| d.keys()) {
            Ok(keys) => protocol::ok_frame(id, |out| etf::put_binary_list(out, keys.iter().map(Vec::as_slice))),
            Err(e) => store_error(id, e),
        })
    }

    /// Destroys a dict: on the bookkeeping thread, as it may have to wait for the VM to
    /// forget it.
    pub fn destroy(&self, id: u64, handle: Handle) {
        self.keep_books(Box::new(move || {
            match registry().destroy(&handle, &registry().detached_gate()) {
                Ok(_) | Err(StoreError::Destroyed) => ok_atom(id),
                Err(StoreError::Interrupted) => unanswered_invalidation(id),
                Err(e) => store_error(id, e),
            }
        }));
    }

    /// Destroys the dicts of dead owners, as [`SharedDicts::destroy`] does one.
    pub fn drop_owners(&self, id: u64, owners: Vec<protocol::Owner>) {
        self.keep_books(Box::new(move || {
            let gate = registry().detached_gate();
            let mut dropped = 0u64;
            for owner in &owners {
                match registry().drop_owner(owner, &gate) {
                    Ok(n) => dropped += n as u64,
                    Err(StoreError::Interrupted) => return unanswered_invalidation(id),
                    Err(e) => return store_error(id, e),
                }
            }
            protocol::ok_frame(id, |out| etf::put_u64(out, dropped))
        }));
    }

    fn keep_books(&self, job: Bookkeeping) {
        if let Err(e) = self.bookkeeper.send(job) {
            // The thread is gone (it only ends with the port): answer rather than lose it.
            let job = e.into_inner();
            self.out.send(job());
        }
    }

    /// Walks the whole store (stopping it meanwhile): a list of what is inconsistent. On a
    /// decoder thread, as it takes every lock.
    pub fn check(self: &Arc<Self>, id: u64) {
        self.submit_decode(Job::Task {
            id,
            what: "SharedDict store check".into(),
            run: Box::new(move |py| {
                let problems = py.detach(|| registry().check());
                protocol::ok_frame(id, |out| etf::put_binary_list(out, problems.iter().map(|p| p.as_bytes())))
            }),
        });
    }

    pub fn give_away(&self, id: u64, handle: &Handle, owner: protocol::Owner, caller: Option<&protocol::Owner>) {
        self.out.send(match registry().give_away(handle, &owner, caller) {
            Ok(()) => ok_atom(id),
            Err(e) => store_error(id, e),
        })
    }

    pub fn get(self: &Arc<Self>, id: u64, handle: Handle, key: Vec<u8>) {
        let Some(dict) = self.lookup(id, &handle) else { return };
        let value = match dict.get(&key) {
            Err(e) => return self.out.send(store_error(id, e)),
            Ok(None) => return self.out.send(protocol::ok_frame(id, |out| etf::put_atom(out, "not_found"))),
            Ok(Some(v)) => v,
        };
        let mut payload = found_payload(value.bytes.len());
        if pickle_etf::pickle_to_etf(&value.bytes, &mut payload).is_err() {
            return self.decode(id, handle, key);
        }
        let mut frame = Some(cached_frame(id, &handle, &key, &payload));
        let out = &self.out;
        let sent = dict.mark_cached_if_same(&key, &value, || {
            if let Some(f) = frame.take() {
                out.send(f)
            }
        });
        if !sent {
            // Changed since it was read, or a change waits for the VM: still a correct
            // answer, but not one to cache.
            self.out.send(payload_frame(id, &payload));
        }
    }

    /// Reads a value that needs Python on a decoder thread.
    fn decode(self: &Arc<Self>, id: u64, handle: Handle, key: Vec<u8>) {
        let me = self.clone();
        self.submit_decode(Job::Task {
            id,
            what: "SharedDict get of a value that needs Python to read".into(),
            run: Box::new(move |py| {
                me.python_decodes.fetch_add(1, Ordering::Relaxed);
                python_get(py, id, &handle, &key)
            }),
        });
    }

    pub fn set(&self, id: u64, handle: Handle, key: Vec<u8>, payload: Vec<u8>) {
        let Some(dict) = self.lookup(id, &handle) else { return };
        match pickle_etf::etf_to_pickle(&payload) {
            Ok(pickled) => self.out.send(match dict.set(&key, &pickled, &Ungated) {
                Ok(()) => ok_atom(id),
                Err(e) => store_error(id, e),
            }),
            // The pickler lives as long as the process.
            Err(_declined) => {
                self.pickler_cancels.lock().queued.insert(id);
                drop(self.pickler.send(PickleJob { id, handle, key, payload }))
            }
        }
    }

    pub fn update_counter(&self, id: u64, handle: &Handle, key: &[u8], incr: &[u8]) {
        let Some(incr) = Int::from_etf(incr) else {
            return self.out.send(protocol::error_frame(Some(id), atom("badarg")));
        };
        let Some(dict) = self.lookup(id, handle) else { return };
        self.out.send(match dict.update(key, &Ungated, |current| counter_update(current, &incr)) {
            Ok(Some(n)) => protocol::ok_frame(id, |out| n.put_etf(out)),
            Ok(None) => protocol::error_frame(Some(id), atom("badarg")),
            Err(e) => store_error(id, e),
        })
    }

    pub fn compare_and_swap(self: &Arc<Self>, id: u64, handle: Handle, key: Vec<u8>, old: Option<Vec<u8>>, new: Vec<u8>) {
        let Some(dict) = self.lookup(id, &handle) else { return };
        match plain_cas(&dict, &key, old.as_deref(), &new) {
            Ok(Ok(swapped)) => self.out.send(bool_frame(id, swapped)),
            Ok(Err(e)) => self.out.send(store_error(id, e)),
            Err(_declined) => {
                let me = self.clone();
                self.submit_decode(Job::Task {
                    id,
                    what: "SharedDict compare_and_swap of a value that needs Python".into(),
                    run: Box::new(move |py| {
                        me.python_decodes.fetch_add(1, Ordering::Relaxed);
                        python_cas(py, id, &dict, &key, old.as_deref(), &new)
                    }),
                });
            }
        }
    }
}

/// Compare-and-swap in Rust, or `Declined` when a value involved needs Python. The stored
/// value, converted as a `get` returns it, must be `=:=` to `old` as Erlang gave it.
fn plain_cas(dict: &Dict, key: &[u8], old: Option<&[u8]>, new: &[u8]) -> Result<Result<bool, StoreError>, Declined> {
    let new = pickle_etf::etf_to_pickle(new)?;
    cas_loop(dict, key, old, &new, |current| {
        let mut have = Vec::new();
        pickle_etf::pickle_to_etf(current, &mut have)?;
        Ok(have)
    })
}

/// [`plain_cas`] with Python doing the conversions, for values it declined.
fn python_cas(py: Python<'_>, id: u64, dict: &Dict, key: &[u8], old: Option<&[u8]>, new: &[u8]) -> Frame {
    let attempt = || -> Result<Result<bool, StoreError>, Failure> {
        let new = pickle_dumps(&convert::decode(py, new).map_err(Failure::Convert)?)?;
        cas_loop(dict, key, old, &new, |current| {
            let mut have = Vec::new();
            convert::encode(&pickle_loads(py, current)?, &mut have).map_err(Failure::Convert)?;
            Ok(have)
        })
    };
    match attempt() {
        Ok(Ok(b)) => bool_frame(id, b),
        Ok(Err(e)) => store_error(id, e),
        Err(f) => protocol::error_frame(Some(id), failure_reason(py, f)),
    }
}

/// Stores `new` if the value under `key`, as `to_etf` converts it, is `=:=` to `old` (a
/// versioned term; `None`: only if the key is absent). The comparison runs outside the dict's
/// lock; the swap then happens only if the entry is still the one compared, else it compares
/// again with what is there now. An Erlang-side change: the VM forgot the key already.
fn cas_loop<E>(
    dict: &Dict,
    key: &[u8],
    old: Option<&[u8]>,
    new: &[u8],
    to_etf: impl Fn(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<Result<bool, StoreError>, E> {
    let Some(old) = old else { return Ok(dict.replace_if_same(key, None, new, &Ungated)) };
    let want = old.get(1..).unwrap_or_default();
    loop {
        let current: Stored = match dict.get(key) {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(Ok(false)),
            Err(e) => return Ok(Err(e)),
        };
        if !pickle_etf::terms_exactly_equal(&to_etf(&current.bytes)?, want) {
            return Ok(Ok(false));
        }
        match dict.replace_if_same(key, Some(&current), new, &Ungated) {
            Ok(false) => continue,
            done => return Ok(done),
        }
    }
}

/// Starts the thread that stores terms that need Python to convert, and returns its queue.
/// Work for the bookkeeping thread: builds its own reply.
type Bookkeeping = Box<dyn FnOnce() -> Frame + Send>;

/// The VM did not answer an invalidation within `callback_timeout`: nothing was changed, and
/// the caller (who has given up by then) hears `timeout`.
fn unanswered_invalidation(id: u64) -> Frame {
    protocol::error_frame(Some(id), atom("timeout"))
}

/// The thread of the Erlang side's whole-dict changes. It runs no Python.
fn start_bookkeeper(out: Outbox) -> std::io::Result<Sender<Bookkeeping>> {
    let (tx, rx) = unbounded::<Bookkeeping>();
    thread::Builder::new().name("pyport-sd-books".into()).spawn(move || {
        for job in rx {
            out.send(job());
        }
    })?;
    Ok(tx)
}

fn start_pickler(out: Outbox, cancels: Arc<Mutex<PicklerCancels>>) -> std::io::Result<Sender<PickleJob>> {
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
                reply = Some(python_set(py, &job, &cancels));
            }
        })
    })?;
    Ok(tx)
}

fn python_get(py: Python<'_>, id: u64, handle: &Handle, key: &[u8]) -> Frame {
    let value = match registry().lookup(handle).and_then(|d| d.get(key)) {
        Err(e) => return store_error(id, e),
        Ok(None) => return protocol::ok_frame(id, |out| etf::put_atom(out, "not_found")),
        Ok(Some(v)) => v.bytes,
    };
    let failure = match pickle_loads(py, &value) {
        Ok(obj) => {
            let mut payload = found_payload(value.len());
            match convert::encode(&obj, &mut payload) {
                Ok(()) => return payload_frame(id, &payload),
                Err(e) => Failure::Convert(e),
            }
        }
        Err(e) => Failure::Python(e),
    };
    protocol::error_frame(Some(id), failure_reason(py, failure))
}

fn python_set(py: Python<'_>, job: &PickleJob, cancels: &Mutex<PicklerCancels>) -> Frame {
    let id = job.id;
    // Check first so that a dead dict is reported as such, not as a conversion error.
    let dict = match registry().lookup(&job.handle) {
        Ok(d) => d,
        Err(e) => {
            cancels.lock().queued.remove(&id);
            return store_error(id, e);
        }
    };
    let pickled = convert::decode(py, &job.payload)
        .map_err(Failure::Convert)
        .and_then(|obj| pickle_dumps(&obj).map_err(Failure::Python));
    let v = match pickled {
        Ok(v) => v,
        Err(f) => {
            cancels.lock().queued.remove(&id);
            return protocol::error_frame(Some(id), failure_reason(py, f));
        }
    };
    // Decided under the dict's lock: a cancel seen here is older than any later write.
    let stored = dict.update(&job.key, &Ungated, |_| {
        let mut c = cancels.lock();
        c.queued.remove(&id);
        if c.cancelled.remove(&id) {
            Update { store: None, answer: false }
        } else {
            Update { store: Some(v), answer: true }
        }
    });
    match stored {
        Ok(true) => ok_atom(id),
        Ok(false) => protocol::error_frame(Some(id), atom("cancelled")),
        Err(e) => store_error(id, e),
    }
}
