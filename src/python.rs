//! The interpreter the port runs in.
//!
//! The port program is the chosen Python itself: the launcher `priv/pyport` starts that
//! interpreter (`python -P -u -c ...`) and has it load this library as the extension module
//! `pyport_core`, whose `main` never returns. Built for the stable ABI of 3.11, the one build
//! serves any CPython 3.11 or later, a virtualenv's interpreter as the virtualenv itself
//! would (its `sys.prefix`, site-packages and `.pth` files, `sys.executable` for
//! `subprocess`/`multiprocessing`), without rebuilding and without finding a libpython:
//! the interpreter brings its own. `-P` keeps the working directory off `sys.path`, `-u`
//! keeps output unbuffered (what is written just before a crash still reaches the log).
//!
//! Here: what the port adds to that interpreter before serving (the `erlang` module, a
//! recursion limit), and for `cargo test`, embedding the build's Python instead.

use pyo3::prelude::*;

/// Python recursion and our converters recurse; give every Python thread room for both.
pub const PYTHON_THREAD_STACK: usize = 16 << 20;

/// Makes the interpreter the port's: the `erlang` module is built in (in `sys.modules`
/// before any user code runs, so an `erlang.py` on `sys.path` cannot shadow it; listed in
/// `sys.builtin_module_names`, its spec's origin `built-in`, as a module compiled into the
/// interpreter would be), and `sys.argv` is `['']` as in an interpreter started without a
/// script (not the launcher's `-c` arguments). Called with the GIL once, before any request.
pub fn adopt(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    // wrap_pymodule! panics when the module's initialisation raises (say, a broken module
    // on PYTHONPATH shadows one it imports): that is an error of this start, not a crash.
    let make = std::panic::AssertUnwindSafe(|| pyo3::wrap_pymodule!(crate::pymodule::erlang)(py));
    let erlang = std::panic::catch_unwind(make).map_err(|panic| {
        let why = panic.downcast_ref::<String>().map(String::as_str).unwrap_or("a panic");
        pyo3::exceptions::PyImportError::new_err(format!("cannot create the erlang module: {why}"))
    })?;
    let erlang = erlang.bind(py);
    let spec = py.import("importlib.machinery")?.getattr("ModuleSpec")?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("origin", "built-in")?;
    erlang.setattr("__spec__", spec.call(("erlang", py.None()), Some(&kwargs))?)?;
    sys.getattr("modules")?.set_item("erlang", erlang)?;
    let names = sys.getattr("builtin_module_names")?.add(("erlang",))?;
    sys.setattr("builtin_module_names", names)?;
    sys.setattr("argv", vec![""])?;
    Ok(())
}

/// Python's default recursion limit (1000) cannot pickle a value nested 1000 levels deep
/// (pickle recurses about twice per level), yet that is the bridge's nesting limit. Worker
/// threads have 16 MiB stacks, so a higher limit is safe there.
pub const RECURSION_LIMIT: i64 = 3000;

pub fn raise_recursion_limit() -> Result<(), String> {
    pyo3::Python::attach(|py| -> pyo3::PyResult<()> {
        let sys = py.import("sys")?;
        let current: i64 = sys.call_method0("getrecursionlimit")?.extract()?;
        if current < RECURSION_LIMIT {
            sys.call_method1("setrecursionlimit", (RECURSION_LIMIT,))?;
        }
        Ok(())
    })
    .map_err(|e| format!("cannot raise the recursion limit: {e}"))
}

// The unit tests are a program of their own: they link the build's libpython (see build.rs).
#[cfg(test)]
include!(concat!(env!("OUT_DIR"), "/link_python.rs"));

/// For unit tests: embeds the build's Python once (its home recorded at build time, so that
/// `$PATH` does not matter), as the port would find it, and releases the GIL.
#[cfg(test)]
pub fn init_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("PYTHONHOME").is_none() {
            std::env::set_var("PYTHONHOME", env!("PYPORT_TEST_PYTHON_HOME"));
        }
        // SAFETY: once per process, before any other use of Python; 0: no signal handlers.
        unsafe { pyo3::ffi::Py_InitializeEx(0) };
        if let Err(e) = Python::attach(adopt) {
            panic!("cannot set up the embedded Python: {e}");
        }
        // SAFETY: this thread holds the GIL after initialisation; hand it to the tests.
        unsafe { pyo3::ffi::PyEval_SaveThread() };
    });
}
