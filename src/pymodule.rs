//! The `erlang` Python module, built into the port program (registered in the inittab, so a
//! PyPI package that installs a top-level `erlang.py` can never shadow it).
//!
//! It holds the Python side of SharedDict, the opaque wrapper for pids/references/ports/funs,
//! and the exception raised in Python code whose Erlang caller gave up.

use crate::etf::{self, Limits, Reader};
use crate::protocol::Handle;
use crate::pickle_etf::{self, Int};
use crate::registry::{Dict, Error as StoreError, PyGate, Registry, Update};
use pyo3::exceptions::{PyBaseException, PyKeyError, PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyInt, PyList, PyString, PyTuple};
use pyo3::{create_exception, intern};
use std::sync::{Arc, OnceLock};

use crate::opaque::{kind_of_tag, term_mac};

create_exception!(
    erlang,
    CallCancelled,
    PyBaseException,
    "Raised asynchronously in Python code whose Erlang caller timed out or died. It derives \
     from BaseException so that `except Exception` does not swallow it."
);
create_exception!(
    erlang,
    SharedDictDestroyed,
    PyRuntimeError,
    "Raised by every SharedDict operation after the dict was destroyed."
);

static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();

/// Installs the port's registry (once, before Python starts).
pub fn install_registry(r: Arc<Registry>) {
    // A second install can only come from tests that share a process; the first one wins.
    let _ = REGISTRY.set(r);
}

/// The port's registry. Outside the port program (unit tests) a small store of its own.
pub fn registry() -> &'static Arc<Registry> {
    REGISTRY.get_or_init(|| match Registry::open(None, 64 << 20, 0) {
        Ok(r) => Arc::new(r),
        // Only where no registry was installed (tests) and the temporary directory is unusable.
        Err(e) => panic!("{e}"),
    })
}

pub fn destroyed_error() -> PyErr {
    SharedDictDestroyed::new_err("SharedDict has been destroyed")
}

// ---------------------------------------------------------------------------------------
// Pickling, shared by the Python class and the Erlang-side get/set.

struct Pickle {
    dumps: Py<PyAny>,
    loads: Py<PyAny>,
}

static PICKLE: PyOnceLock<Pickle> = PyOnceLock::new();

fn pickle(py: Python<'_>) -> PyResult<&Pickle> {
    PICKLE.get_or_try_init(py, || {
        let m = py.import("pickle")?;
        Ok(Pickle { dumps: m.getattr("dumps")?.unbind(), loads: m.getattr("loads")?.unbind() })
    })
}

pub fn pickle_dumps(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let py = value.py();
    let b = pickle(py)?.dumps.bind(py).call1((value, 5))?;
    Ok(b.cast::<PyBytes>()?.as_bytes().to_vec())
}

pub fn pickle_loads<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    pickle(py)?.loads.bind(py).call1((PyBytes::new(py, bytes),))
}

/// One step of an atomic counter, from either side: adds `incr` to the stored int (a missing
/// key counts from 0). The answer is `None`, and nothing is stored, when the stored value is
/// not a plain `int` (a bool, a float, an `int` subclass are not counters).
pub fn counter_update(current: Option<&[u8]>, incr: &Int) -> Update<Vec<u8>, Option<Int>> {
    let old = match current {
        None => Some(Int::from_i64(0)),
        Some(v) => pickle_etf::pickle_int(v),
    };
    match old {
        Some(old) => {
            let new = old.add(incr);
            Update { store: Some(new.to_pickle()), answer: Some(new) }
        }
        None => Update { store: None, answer: None },
    }
}

/// A Python `int` (exactly; not a bool) as a counter increment.
fn int_arg(n: &Bound<'_, PyAny>) -> PyResult<Int> {
    if !n.is_exact_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!("SharedDict.incr: n must be an int, not {}", n.get_type().name()?)));
    }
    if let Ok(v) = n.extract::<i64>() {
        return Ok(Int::from_i64(v));
    }
    pickle_etf::pickle_int(&pickle_dumps(n)?).ok_or_else(|| PyTypeError::new_err("SharedDict.incr: n must be an int"))
}

fn int_object<'py>(py: Python<'py>, n: &Int) -> PyResult<Bound<'py, PyAny>> {
    pickle_loads(py, &n.to_pickle())
}

/// `erlang.ABSENT`, the `old` value of a compare-and-swap that wants the key absent.
static ABSENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn is_absent(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = obj.py();
    let absent = ABSENT.get_or_try_init(py, || -> PyResult<Py<PyAny>> { Ok(py.import("erlang")?.getattr("ABSENT")?.unbind()) })?;
    Ok(obj.is(absent.bind(py)))
}

// ---------------------------------------------------------------------------------------
// Opaque Erlang terms.

/// A pid, reference, port or fun, carried through Python unchanged and returned to Erlang as
/// the identical term. Hashable, comparable and picklable.
///
/// Python cannot make one up: it carries a MAC of its bytes under a key that only this port
/// knows, and the constructor (which pickle uses) checks it. Otherwise any code could mint
/// pids "of" other nodes, which Erlang would take as real, and fill the VM's atom table with
/// their node names.
#[pyclass(module = "erlang", name = "OpaqueTerm", frozen, eq, hash)]
#[derive(PartialEq, Eq, Hash, Clone)]
pub struct OpaqueTerm {
    kind: &'static str,
    /// The term's external format, without the version byte.
    bytes: Vec<u8>,
}

impl OpaqueTerm {
    /// For terms that came from Erlang: checks that `bytes` hold exactly one opaque term.
    pub fn new_checked(bytes: &[u8]) -> Option<OpaqueTerm> {
        let kind = kind_of_tag(*bytes.first()?)?;
        let mut r = Reader::new(bytes);
        etf::skip_term(&mut r, 0, Limits::PAYLOAD).ok()?;
        r.expect_end().ok()?;
        Some(OpaqueTerm { kind, bytes: bytes.to_vec() })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// 'pid', 'reference', 'port' or 'fun'.
    pub fn kind_str(&self) -> &'static str {
        self.kind
    }
}

#[pymethods]
impl OpaqueTerm {
    /// Rebuilds an opaque term from what `__reduce__` gave (used by pickle). Only terms that
    /// Erlang sent to this port can be rebuilt: `mac` must match.
    #[new]
    #[pyo3(signature = (kind, data, mac=None))]
    fn py_new(kind: &str, data: &[u8], mac: Option<&[u8]>) -> PyResult<Self> {
        if mac != Some(&term_mac(data)[..]) {
            return Err(PyValueError::new_err(
                "an erlang.OpaqueTerm can only be rebuilt from a term that Erlang sent to this port",
            ));
        }
        match OpaqueTerm::new_checked(data) {
            Some(t) if t.kind == kind => Ok(t),
            _ => Err(PyValueError::new_err(format!("not the external format of an Erlang {kind}"))),
        }
    }

    /// 'pid', 'reference', 'port' or 'fun'.
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// The term in the Erlang external term format (without the version byte).
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.bytes)
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let this = slf.get();
        let args = (this.kind, PyBytes::new(py, &this.bytes), PyBytes::new(py, &term_mac(&this.bytes)));
        (slf.get_type(), args).into_pyobject(py)
    }

    fn __repr__(&self) -> String {
        let digest = self.bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        format!("<erlang.OpaqueTerm {} #{:08x}>", self.kind, digest as u32)
    }
}

// ---------------------------------------------------------------------------------------
// SharedDict.

/// The handle of a SharedDict, as Erlang passes it to Python. Wrap it with
/// `SharedDict(handle)`; returned to Erlang it becomes the same handle term again.
#[pyclass(module = "erlang", name = "SharedDictHandle", frozen, eq, hash)]
#[derive(PartialEq, Eq, Hash, Clone)]
pub struct SharedDictHandle {
    pub handle: Handle,
}

#[pymethods]
impl SharedDictHandle {
    #[new]
    fn py_new(generation: u64, id: u64, token: Vec<u8>) -> Self {
        SharedDictHandle { handle: Handle { generation, id, token } }
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let h = &slf.get().handle;
        (slf.get_type(), (h.generation, h.id, PyBytes::new(py, &h.token))).into_pyobject(py)
    }

    fn __repr__(&self) -> String {
        format!("<erlang.SharedDictHandle generation={} id={}>", self.handle.generation, self.handle.id)
    }
}

/// The native part of `erlang.SharedDict`; the Python class adds the `MutableMapping` mixins.
#[pyclass(module = "erlang", name = "_SharedDictCore", subclass)]
pub struct SharedDictCore {
    handle: Handle,
    /// None when the handle never named a live dict of this pool.
    dict: Option<Dict>,
}

impl SharedDictCore {
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    fn dict(&self) -> PyResult<&Dict> {
        self.dict.as_ref().ok_or_else(destroyed_error)
    }
}

/// A store operation's result in Python: `Destroyed` is `SharedDictDestroyed`, a write that
/// does not fit `MemoryError`, a wait for Erlang that ended (the caller gave up) its own error.
fn live<T>(r: Result<T, StoreError>) -> PyResult<T> {
    r.map_err(store_error)
}

fn gated<T>(r: Result<T, StoreError>, gate: &PyGate<'_, '_>) -> PyResult<T> {
    r.map_err(|e| match (e, gate.take_failure()) {
        (StoreError::Interrupted, Some(err)) => err,
        (e, _) => store_error(e),
    })
}

pub fn store_error(e: StoreError) -> PyErr {
    match e {
        StoreError::Destroyed => destroyed_error(),
        StoreError::Full => PyMemoryError::new_err(
            "the SharedDict store is full (app env shared_dict_memory); delete entries or raise it",
        ),
        e => PyRuntimeError::new_err(format!("SharedDict: {e}")),
    }
}

/// SharedDict keys are bytes on the wire: `str` is UTF-8 encoded, so `'k'`, `b'k'` and
/// Erlang's `<<"k">>` name the same entry.
fn key_bytes(key: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = key.cast::<PyString>() {
        Ok(s.to_str()?.as_bytes().to_vec())
    } else if let Ok(b) = key.cast::<PyBytes>() {
        Ok(b.as_bytes().to_vec())
    } else {
        Err(PyTypeError::new_err(format!(
            "SharedDict keys must be str or bytes, not {}",
            key.get_type().name()?
        )))
    }
}

fn key_object<'py>(py: Python<'py>, key: &[u8]) -> Bound<'py, PyAny> {
    match std::str::from_utf8(key) {
        Ok(s) => PyString::new(py, s).into_any(),
        Err(_) => PyBytes::new(py, key).into_any(),
    }
}

/// Resolves a handle-like object (a `SharedDictHandle` or a `SharedDict`) to its handle.
pub fn handle_of(obj: &Bound<'_, PyAny>) -> Option<Handle> {
    if let Ok(h) = obj.cast::<SharedDictHandle>() {
        Some(h.get().handle.clone())
    } else if let Ok(sd) = obj.cast::<SharedDictCore>() {
        Some(sd.borrow().handle.clone())
    } else {
        None
    }
}

#[pymethods]
impl SharedDictCore {
    #[new]
    fn py_new(handle: &Bound<'_, PyAny>) -> PyResult<Self> {
        let handle = handle_of(handle).ok_or_else(|| {
            let ty = handle.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            PyTypeError::new_err(format!(
                "SharedDict() takes a SharedDict handle passed from Erlang (py:shared_dict_new/0) \
                 or another SharedDict, not {ty}"
            ))
        })?;
        let dict = registry().lookup(&handle).ok();
        Ok(SharedDictCore { handle, dict })
    }

    /// The handle of this dict (returned to Erlang as the same `SD` term).
    #[getter(handle)]
    fn get_handle(&self) -> SharedDictHandle {
        SharedDictHandle { handle: self.handle.clone() }
    }

    fn __getitem__<'py>(&self, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        match live(self.dict()?.get(&key_bytes(key)?))? {
            Some(v) => pickle_loads(key.py(), &v.bytes),
            None => Err(PyKeyError::new_err(key.clone().unbind())),
        }
    }

    fn __setitem__(&self, key: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let k = key_bytes(key)?;
        let dict = self.dict()?;
        // Pickle before taking the dict's lock: pickling runs Python code.
        let v = pickle_dumps(value)?;
        let gate = registry().gate(key.py());
        gated(dict.set(&k, &v, &gate), &gate)
    }

    fn __delitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<()> {
        let gate = registry().gate(key.py());
        if gated(self.dict()?.del(&key_bytes(key)?, &gate), &gate)? {
            Ok(())
        } else {
            Err(PyKeyError::new_err(key.clone().unbind()))
        }
    }

    fn __contains__(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let dict = self.dict()?;
        match key_bytes(key) {
            Ok(k) => live(dict.contains(&k)),
            // Like dict: `1 in d` is simply False, not an error.
            Err(_) => live(dict.len()).map(|_| false),
        }
    }

    fn __len__(&self) -> PyResult<usize> {
        live(self.dict()?.len())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.keys(py)?.as_any().try_iter()?.into_any())
    }

    /// The keys, in insertion order, as a list (`str`, or `bytes` for keys that are not UTF-8).
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let keys = live(self.dict()?.keys())?;
        PyList::new(py, keys.iter().map(|k| key_object(py, k)))
    }

    /// The value for `key`, or `default` only when the key is missing.
    #[pyo3(signature = (key, default = None))]
    fn get<'py>(&self, key: &Bound<'py, PyAny>, default: Option<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let py = key.py();
        match live(self.dict()?.get(&key_bytes(key)?))? {
            Some(v) => pickle_loads(py, &v.bytes),
            None => Ok(default.unwrap_or_else(|| py.None().into_bound(py))),
        }
    }

    /// Removes `key` and returns its value; `default` if missing, else KeyError. Atomic.
    #[pyo3(signature = (key, *default))]
    fn pop<'py>(&self, key: &Bound<'py, PyAny>, default: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyAny>> {
        let py = key.py();
        if default.len() > 1 {
            return Err(PyTypeError::new_err(format!("pop expected at most 2 arguments, got {}", default.len() + 1)));
        }
        let gate = registry().gate(py);
        match gated(self.dict()?.take(&key_bytes(key)?, &gate), &gate)? {
            Some(v) => pickle_loads(py, &v),
            None if default.len() == 1 => default.get_item(0),
            None => Err(PyKeyError::new_err(key.clone().unbind())),
        }
    }

    /// Adds `n` to the int stored under `key` and returns the new value, atomically against
    /// every other operation from either side. A missing key counts from 0; a value that is
    /// not an `int` (a bool, a float) raises TypeError and stays as it is.
    #[pyo3(signature = (key, n = None))]
    fn incr<'py>(&self, key: &Bound<'py, PyAny>, n: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let py = key.py();
        let k = key_bytes(key)?;
        let incr = match n {
            Some(n) => int_arg(n)?,
            None => Int::from_i64(1),
        };
        let gate = registry().gate(py);
        match gated(self.dict()?.update(&k, &gate, |current| counter_update(current, &incr)), &gate)? {
            Some(new) => int_object(py, &new),
            None => Err(PyTypeError::new_err(format!("SharedDict.incr: the value under {} is not an int", key.repr()?))),
        }
    }

    /// Stores `new` under `key` if the value there equals `old` (same type and `==`), as one
    /// step against every other operation from either side; returns whether it did.
    /// `old=erlang.ABSENT`: only if `key` is absent.
    fn compare_and_swap(&self, key: &Bound<'_, PyAny>, old: &Bound<'_, PyAny>, new: &Bound<'_, PyAny>) -> PyResult<bool> {
        let py = key.py();
        let k = key_bytes(key)?;
        let dict = self.dict()?;
        let new = pickle_dumps(new)?;
        let gate = registry().gate(py);
        if is_absent(old)? {
            return gated(dict.replace_if_same(&k, None, &new, &gate), &gate);
        }
        loop {
            let Some(current) = live(dict.get(&k))? else { return Ok(false) };
            // Compared outside the dict's lock (it runs Python code); the swap then only
            // happens if nobody changed the entry meanwhile, else compare again.
            let value = pickle_loads(py, &current.bytes)?;
            if !value.get_type().is(&old.get_type()) || !value.eq(old)? {
                return Ok(false);
            }
            if gated(dict.replace_if_same(&k, Some(&current), &new, &gate), &gate)? {
                return Ok(true);
            }
        }
    }

    /// Removes every entry (atomically).
    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        let gate = registry().gate(py);
        gated(self.dict()?.clear(&gate), &gate)
    }

    /// Destroys the dict for every holder, in Python and in Erlang. Idempotent.
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        if self.dict.is_some() {
            let gate = registry().gate(py);
            gated(registry().destroy(&self.handle, &gate), &gate)?;
        }
        Ok(())
    }

    /// Whether the dict has been destroyed.
    #[getter]
    fn destroyed(&self) -> bool {
        self.dict.as_ref().is_none_or(|d| d.is_destroyed())
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let handle = SharedDictHandle { handle: slf.borrow().handle.clone() };
        (slf.get_type(), (handle,)).into_pyobject(py)
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        let py = slf.py();
        let this = slf.borrow();
        let id = this.handle.id;
        let Some(dict) = this.dict.as_ref() else { return Ok(format!("<SharedDict id={id} destroyed>")) };
        let Ok(items) = dict.items() else { return Ok(format!("<SharedDict id={id} destroyed>")) };
        let mut parts = Vec::with_capacity(items.len());
        for (k, v) in items.iter().take(20) {
            let value = pickle_loads(py, v).and_then(|o| o.repr().map(|r| r.to_string()));
            let value = value.unwrap_or_else(|_| "<unpicklable>".to_string());
            parts.push(format!("{}: {}", key_object(py, k).repr()?, value));
        }
        if items.len() > 20 {
            parts.push(format!("... ({} more)", items.len() - 20));
        }
        Ok(format!("<SharedDict id={id} {{{}}}>", parts.join(", ")))
    }
}

/// Python half of `SharedDict`: a `MutableMapping` subclass of the native core, so that
/// `items`, `values`, `setdefault`, `update`, `popitem` and `==` behave as users expect.
const SHARED_DICT_PY: &std::ffi::CStr = cr#"
from collections.abc import MutableMapping as _MutableMapping

class SharedDict(_SharedDictCore, _MutableMapping):
    """A dictionary shared between Erlang and Python, created by Erlang with
    py:shared_dict_new/0 and owned by an Erlang process.

    sd = SharedDict(handle) wraps a handle passed from Erlang (call arguments, eval/exec
    locals). Keys are str or bytes ('k' and b'k' are the same key); values are pickled on
    store and unpickled on read, so mutating a value you read never changes the dict.
    After destroy() (from either side, or when the owner exits) every operation raises
    SharedDictDestroyed, a RuntimeError.
    """
    __slots__ = ()


class _Absent:
    """The type of erlang.ABSENT: SharedDict.compare_and_swap(key, ABSENT, new) stores new
    only if key is absent."""
    __slots__ = ()

    def __repr__(self):
        return "erlang.ABSENT"

    def __reduce__(self):
        return "ABSENT"


ABSENT = _Absent()
del _MutableMapping
"#;

#[pymodule]
pub mod erlang {
    #[pymodule_export]
    use super::{OpaqueTerm, SharedDictCore, SharedDictHandle};

    use super::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        m.add("CallCancelled", py.get_type::<CallCancelled>())?;
        m.add("SharedDictDestroyed", py.get_type::<SharedDictDestroyed>())?;
        m.add("NESTING_LIMIT", etf::MAX_DEPTH)?;
        let globals = m.dict();
        globals.set_item(intern!(py, "__builtins__"), py.import("builtins")?)?;
        py.run(SHARED_DICT_PY, Some(&globals), None)?;
        crate::pylog::register(m)?;
        crate::richtypes::register(m)?;
        Ok(())
    }
}
