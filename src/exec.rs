//! Running requests in Python: process namespaces, cached code objects, call targets and
//! the shape of Python errors sent back to Erlang.
//!
//! Everything here runs on a thread that is attached to the interpreter.

use crate::convert::{self, ConvertError};
use crate::etf;
use crate::protocol::{self, atom, binary, tuple, Owner};
use crate::pymodule::CallCancelled;
use eetf::Term;
use parking_lot::Mutex;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyCode, PyDict, PyList, PyModule, PyString, PyTuple, PyType};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::OnceLock;

/// Compiled code objects are cached by source text; this bounds the cache for programs that
/// generate code (the cache is simply emptied when full).
const CODE_CACHE_LIMIT: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Eval = 0,
    Exec = 1,
}

/// The result of a request: a reply frame body ready for the writer.
pub type Frame = Vec<u8>;

/// What a `call` or `eval` came to: a reply, or a coroutine (the call of an `async def`
/// function) to await before there is one (see `aio`).
pub enum Outcome {
    Reply(Frame),
    Coroutine(Py<PyAny>),
}

/// State shared by all threads that run Python.
pub struct Interp {
    namespaces: Mutex<HashMap<Owner, Py<PyDict>>>,
    /// Compiled code by source text, one map per mode (looked up by `&str`, no allocation).
    code_cache: Mutex<[HashMap<String, Py<PyCode>>; 2]>,
}

impl Default for Interp {
    fn default() -> Self {
        Self::new()
    }
}

impl Interp {
    pub fn new() -> Self {
        Interp { namespaces: Mutex::new(HashMap::new()), code_cache: Mutex::new([HashMap::new(), HashMap::new()]) }
    }

    pub fn namespace_count(&self) -> usize {
        self.namespaces.lock().len()
    }

    /// Forgets an owner's namespace. Safe without the GIL: pyo3 defers the decref to the next
    /// thread that attaches.
    pub fn drop_namespace(&self, owner: &Owner) -> bool {
        let removed = self.namespaces.lock().remove(owner);
        removed.is_some()
    }

    /// The owner's globals, created on first use as a fresh `__main__`-like namespace.
    fn namespace<'py>(&self, py: Python<'py>, owner: &Owner) -> PyResult<Bound<'py, PyDict>> {
        if let Some(ns) = self.namespaces.lock().get(owner) {
            return Ok(ns.bind(py).clone());
        }
        let ns = PyDict::new(py);
        ns.set_item("__builtins__", py.import("builtins")?)?;
        ns.set_item("__name__", "__main__")?;
        // Imported in every namespace, as erlang_python does; a user's own `erlang`,
        // assigned later, replaces it.
        ns.set_item("erlang", py.import("erlang")?)?;
        let mut map = self.namespaces.lock();
        // Another request of the same owner may have raced us here; keep the first.
        Ok(map.entry(owner.clone()).or_insert_with(|| ns.unbind()).bind(py).clone())
    }

    fn compile<'py>(&self, py: Python<'py>, code: &str, mode: Mode) -> PyResult<Bound<'py, PyCode>> {
        if let Some(c) = self.code_cache.lock()[mode as usize].get(code) {
            return Ok(c.bind(py).clone());
        }
        let (source, start) = match mode {
            // As Python's own eval() does, leading spaces and tabs do not count as indentation.
            Mode::Eval => (code.trim_start_matches([' ', '\t']), ffi::Py_eval_input),
            Mode::Exec => (code, ffi::Py_file_input),
        };
        let src = CString::new(source)
            .map_err(|_| pyo3::exceptions::PyValueError::new_err("source code contains a NUL byte"))?;
        // SAFETY: GIL held; both strings are NUL-terminated and outlive the call.
        let compiled = unsafe {
            let ptr = ffi::Py_CompileString(src.as_ptr(), c"<pyport>".as_ptr(), start);
            Bound::from_owned_ptr_or_err(py, ptr)?.cast_into::<PyCode>()?
        };
        let mut caches = self.code_cache.lock();
        let cache = &mut caches[mode as usize];
        if cache.len() >= CODE_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(code.to_string(), compiled.clone().unbind());
        Ok(compiled)
    }

    /// `eval`/`exec`: binds the locals into the owner's namespace, then runs the code there.
    pub fn run_code(&self, py: Python<'_>, id: u64, owner: &Owner, code: &str, payload: &[u8], mode: Mode) -> Outcome {
        let _caller = crate::pylog::CallerGuard::set(owner);
        let result = (|| -> Result<Bound<'_, PyAny>, Failure> {
            let ns = self.namespace(py, owner)?;
            let locals = convert::decode_wrapped(py, payload, 1)?;
            let locals = locals.cast_into::<PyDict>().map_err(|_| Failure::bad("locals must be a map"))?;
            check_local_names(&locals)?;
            ns.update(locals.as_mapping())?;
            let compiled = self.compile(py, code, mode)?;
            // SAFETY: GIL held; `compiled` is a code object and `ns` a dict.
            let value = unsafe {
                let ptr = ffi::PyEval_EvalCode(compiled.as_ptr(), ns.as_ptr(), ns.as_ptr());
                Bound::from_owned_ptr_or_err(py, ptr)?
            };
            Ok(if mode == Mode::Exec { py.None().into_bound(py) } else { value })
        })();
        finish_or_await(py, id, result)
    }

    /// `call`: `Module.Function(*Args, **Kwargs)`, or a function of the owner's namespace
    /// when the module is `__main__`.
    pub fn run_call(&self, py: Python<'_>, id: u64, owner: &Owner, module: &str, function: &str, payload: &[u8]) -> Outcome {
        let _caller = crate::pylog::CallerGuard::set(owner);
        let result = self.call_function(py, owner, module, function, payload);
        let outcome = finish_or_await(py, id, result);
        crate::latency::mark(crate::latency::Mark::Encoded);
        outcome
    }

    /// What a `call` request's function returns (the caller marks the thread as the owner's).
    pub fn call_function<'py>(
        &self,
        py: Python<'py>,
        owner: &Owner,
        module: &str,
        function: &str,
        payload: &[u8],
    ) -> Result<Bound<'py, PyAny>, Failure> {
        let target = self.resolve(py, owner, module, function)?;
        let decoded = convert::decode_wrapped(py, payload, 2)?;
        let pair = decoded.cast::<PyTuple>().map_err(|_| Failure::bad("call payload must be {Args, Kwargs}"))?;
        if pair.len() != 2 {
            return Err(Failure::bad("call payload must be {Args, Kwargs}"));
        }
        let args = pair.get_item(0)?;
        let args = args.cast::<PyList>().map_err(|_| Failure::bad("Args must be a list"))?;
        let kwargs = pair.get_item(1)?;
        let kwargs = kwargs.cast::<PyDict>().map_err(|_| Failure::bad("Kwargs must be a map"))?;
        if module == "builtins" && kwargs.is_empty() {
            if let Some(value) = self.frame_builtin(py, owner, function, &target, args)? {
                return Ok(value);
            }
        }
        let args = PyTuple::new(py, args.iter())?;
        let kwargs = if kwargs.is_empty() { None } else { Some(kwargs) };
        crate::latency::mark(crate::latency::Mark::CallStart);
        let value = target.call(args, kwargs);
        crate::latency::mark(crate::latency::Mark::CallEnd);
        Ok(value?)
    }

    /// The builtins that read the calling frame (`eval`, `exec`, `vars`, `dir`, `locals`,
    /// `globals`) have no frame when called from here ("frame does not exist"). Called
    /// without the arguments that name a namespace, they get the caller's namespace, as if
    /// called from code run by `exec`. Returns None for every other call.
    fn frame_builtin<'py>(
        &self,
        py: Python<'py>,
        owner: &Owner,
        function: &str,
        target: &Bound<'py, PyAny>,
        args: &Bound<'py, PyList>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let value = match (function, args.len()) {
            ("eval" | "exec", 1) => {
                let ns = self.namespace(py, owner)?;
                target.call1((args.get_item(0)?, ns))?
            }
            ("vars" | "locals" | "globals", 0) => self.namespace(py, owner)?.into_any(),
            ("dir", 0) => {
                let names = self.namespace(py, owner)?.keys();
                names.sort()?;
                names.into_any()
            }
            _ => return Ok(None),
        };
        Ok(Some(value))
    }

    fn resolve<'py>(&self, py: Python<'py>, owner: &Owner, module: &str, function: &str) -> Result<Bound<'py, PyAny>, Failure> {
        let mut parts = function.split('.');
        let first = parts.next().unwrap_or_default();
        let mut target = if module == "__main__" {
            let ns = self.namespace(py, owner)?;
            match ns.get_item(first)? {
                Some(f) => f,
                None => {
                    return Err(PyErr::new::<pyo3::exceptions::PyNameError, _>(format!(
                        "name '{first}' is not defined in this process's namespace"
                    ))
                    .into())
                }
            }
        } else {
            import(py, module)?.getattr(first)?
        };
        for part in parts {
            target = target.getattr(part)?;
        }
        if !target.is_callable() {
            let repr = target.repr().map(|r| r.to_string()).unwrap_or_default();
            return Err(Failure::Reason(tuple(vec![atom("not_callable"), binary(repr.as_bytes())])));
        }
        Ok(target)
    }

    /// `startup`: prepends sys.path entries and runs code in the real `__main__` module.
    pub fn run_startup(&self, py: Python<'_>, id: u64, sys_path: &[String], code: &str) -> Frame {
        let result = (|| -> Result<Bound<'_, PyAny>, Failure> {
            let path = py.import("sys")?.getattr("path")?;
            let path = path.cast::<PyList>().map_err(|_| Failure::bad("sys.path is not a list"))?;
            for (i, p) in sys_path.iter().enumerate() {
                path.insert(i, p)?;
            }
            let main = py.import("__main__")?.dict();
            if !main.contains("erlang")? {
                main.set_item("erlang", py.import("erlang")?)?;
            }
            if !code.is_empty() {
                let compiled = self.compile(py, code, Mode::Exec)?;
                // SAFETY: as in run_code.
                unsafe {
                    let ptr = ffi::PyEval_EvalCode(compiled.as_ptr(), main.as_ptr(), main.as_ptr());
                    Bound::from_owned_ptr_or_err(py, ptr)?;
                }
            }
            Ok(py.None().into_bound(py))
        })();
        finish(py, id, result)
    }
}

/// Locals become variables, so their names must be identifiers, and not dunder names or
/// keywords: binding `__builtins__` would break every later call of the owner. The Erlang
/// side checks this too (raising `badarg`); this keeps other clients from doing harm.
fn check_local_names(locals: &Bound<'_, PyDict>) -> Result<(), Failure> {
    if locals.is_empty() {
        return Ok(());
    }
    let py = locals.py();
    let iskeyword = py.import("keyword")?.getattr("iskeyword")?;
    for key in locals.keys() {
        let ok = match key.cast::<PyString>() {
            Ok(s) => {
                let name = s.to_str()?;
                let dunder = name.len() > 4 && name.starts_with("__") && name.ends_with("__");
                !dunder && s.call_method0("isidentifier")?.is_truthy()? && !iskeyword.call1((s,))?.is_truthy()?
            }
            Err(_) => false,
        };
        if !ok {
            let repr = key.repr().map(|r| r.to_string()).unwrap_or_default();
            return Err(Failure::bad(&format!("locals key {repr} is not a Python identifier")));
        }
    }
    Ok(())
}

fn import<'py>(py: Python<'py>, module: &str) -> PyResult<Bound<'py, PyAny>> {
    // sys.modules is a plain dict lookup; the import machinery only runs on a miss, or when
    // the module is still being imported by another thread (its __spec__._initializing is
    // set): the import machinery then waits for it, where sys.modules would hand out a
    // half-initialised module (CT caught `py:call` racing start-up code's import).
    // SAFETY: GIL held; PyImport_GetModuleDict returns a borrowed reference to sys.modules.
    let modules = unsafe { Bound::from_borrowed_ptr(py, ffi::PyImport_GetModuleDict()) };
    if let Ok(d) = modules.cast::<PyDict>() {
        if let Some(m) = d.get_item(module)? {
            if !is_initializing(&m) {
                return Ok(m);
            }
        }
    }
    Ok(py.import(module)?.into_any())
}

/// `module.__spec__._initializing`, read through the instance dicts: modules that were
/// never loaded by importlib (`sys`, `builtins`) have no such attribute, and a failed
/// getattr would build an AttributeError on every call.
fn is_initializing(module: &Bound<'_, PyAny>) -> bool {
    let py = module.py();
    let Ok(m) = module.cast::<PyModule>() else { return false };
    let Ok(Some(spec)) = m.dict().get_item(intern!(py, "__spec__")) else { return false };
    if spec.is_none() {
        return false;
    }
    let Ok(attrs) = spec.getattr(intern!(py, "__dict__")) else { return false };
    let Ok(attrs) = attrs.cast_into::<PyDict>() else { return false };
    matches!(attrs.get_item(intern!(py, "_initializing")), Ok(Some(flag)) if flag.is_truthy().unwrap_or(false))
}

/// Why a request failed, before it is turned into an Erlang reason.
pub enum Failure {
    Python(PyErr),
    Convert(ConvertError),
    Reason(Term),
}

impl Failure {
    fn bad(msg: &str) -> Self {
        Failure::Reason(tuple(vec![atom("bad_request"), binary(msg.as_bytes())]))
    }
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::Python(e)
    }
}

impl From<ConvertError> for Failure {
    fn from(e: ConvertError) -> Self {
        Failure::Convert(e)
    }
}

/// A coroutine result is handed back to be awaited; anything else becomes the reply.
fn finish_or_await(py: Python<'_>, id: u64, result: Result<Bound<'_, PyAny>, Failure>) -> Outcome {
    match result {
        Ok(value) if is_coroutine(&value) => Outcome::Coroutine(value.unbind()),
        other => Outcome::Reply(finish(py, id, other)),
    }
}

/// Whether a result is a coroutine (what calling an `async def` function returns): its type
/// is exactly `types.CoroutineType` (`PyCoro_CheckExact`, which the stable ABI lacks).
fn is_coroutine(value: &Bound<'_, PyAny>) -> bool {
    static COROUTINE: pyo3::sync::PyOnceLock<Py<PyType>> = pyo3::sync::PyOnceLock::new();
    let py = value.py();
    let coroutine = COROUTINE.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        Ok(py.import("types")?.getattr("CoroutineType")?.cast_into::<PyType>()?.unbind())
    });
    match coroutine {
        Ok(t) => value.get_type().is(t.bind(py)),
        Err(_) => false,
    }
}

/// Encodes a result as `{Id, ok, <<Term>>}` or a failure as `{Id, error, Reason}`.
pub fn finish(py: Python<'_>, id: u64, result: Result<Bound<'_, PyAny>, Failure>) -> Frame {
    let failure = match result {
        Ok(value) => {
            let (mut out, len_at) = protocol::begin_ok_frame(id, 64);
            out.push(etf::VERSION);
            match convert::encode(&value, &mut out) {
                Ok(()) => {
                    protocol::finish_ok_frame(&mut out, len_at);
                    return out;
                }
                Err(e) => Failure::Convert(e),
            }
        }
        Err(f) => f,
    };
    protocol::error_frame(Some(id), failure_reason(py, failure))
}

pub fn failure_reason(py: Python<'_>, f: Failure) -> Term {
    match f {
        Failure::Reason(t) => t,
        Failure::Python(e) => python_error(py, &e),
        Failure::Convert(ConvertError::Python(e)) => python_error(py, &e),
        Failure::Convert(ConvertError::Term(t)) => protocol::term_error_reason(&t),
        Failure::Convert(ConvertError::DuplicateKey(k)) => tuple(vec![atom("duplicate_key"), binary(k.as_bytes())]),
        Failure::Convert(ConvertError::Unsupported(m)) => tuple(vec![atom("unsupported_term"), binary(m.as_bytes())]),
    }
}

/// The built-in exception classes, by type object address, as they were when the port
/// started (before any user code could add to `builtins`). Their names are atoms in Erlang.
static BUILTIN_EXCEPTIONS: OnceLock<HashMap<usize, String>> = OnceLock::new();

/// Records the built-in exception classes; returns their names for the ready frame, so that
/// the Erlang side can make those atoms (and only those) before any reply names one.
pub fn snapshot_builtin_exceptions(py: Python<'_>) -> PyResult<Vec<String>> {
    let base = py.get_type::<pyo3::exceptions::PyBaseException>();
    let mut found = HashMap::new();
    for value in py.import("builtins")?.dict().values() {
        if let Ok(ty) = value.cast::<PyType>() {
            if ty.is_subclass(&base)? {
                // The class's own name: `IOError` and `EnvironmentError` are other names
                // for `OSError`, which is what Python itself calls it.
                found.insert(ty.as_ptr() as usize, ty.name()?.to_string());
            }
        }
    }
    let mut names: Vec<String> = found.values().cloned().collect();
    names.sort();
    names.dedup();
    let _ = BUILTIN_EXCEPTIONS.set(found);
    Ok(names)
}

/// `{python, Type, Message, Traceback}`; the cancellation exception becomes `cancelled`.
/// `Type` is an atom for a built-in class and a binary of the qualified name for any other:
/// class names are chosen by Python code, and atoms are never collected.
pub fn python_error(py: Python<'_>, e: &PyErr) -> Term {
    if e.is_instance_of::<CallCancelled>(py) {
        return atom("cancelled");
    }
    let ty = e.get_type(py);
    let builtin = BUILTIN_EXCEPTIONS.get().and_then(|b| b.get(&(ty.as_ptr() as usize)));
    let (type_term, name) = match builtin {
        Some(name) => (atom(name), name.clone()),
        None => {
            let name = convert::type_name(&ty);
            (binary(name.as_bytes()), name)
        }
    };
    let value = e.value(py);
    let message = value.str().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let traceback = format_traceback(py, e).unwrap_or_else(|| format!("{name}: {message}\n"));
    tuple(vec![atom("python"), type_term, binary(message.as_bytes()), binary(traceback.as_bytes())])
}

fn format_traceback(py: Python<'_>, e: &PyErr) -> Option<String> {
    let tb = py.import("traceback").ok()?;
    let lines = tb
        .call_method1("format_exception", (e.get_type(py), e.value(py), e.traceback(py)))
        .ok()?;
    let joined = PyString::new(py, "").call_method1("join", (lines,)).ok()?;
    joined.extract::<String>().ok()
}

