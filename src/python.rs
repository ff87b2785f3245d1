//! Starting the embedded interpreter.
//!
//! Initialisation goes through PEP 587's `PyConfig` with the home and executable recorded at
//! build time: left to itself, CPython derives its home from whatever `python3` is first on
//! `$PATH`, which breaks the standard library under a different PATH and points
//! `sys.executable` (and so `subprocess`/`multiprocessing`) at the wrong interpreter.

use pyo3::ffi;
use std::ffi::{CStr, CString};
use std::sync::Once;

/// Python recursion and our converters recurse; give every Python thread room for both.
pub const PYTHON_THREAD_STACK: usize = 16 << 20;

/// The interpreter this binary was built against.
pub const BUILD_HOME: &str = env!("PYPORT_PYTHON_HOME");
pub const BUILD_EXECUTABLE: &str = env!("PYPORT_PYTHON_EXECUTABLE");

pub struct Settings {
    pub home: String,
    pub executable: String,
}

impl Settings {
    /// Build-time values, with `PYPORT_PYTHONHOME` / `PYPORT_PYTHON` overriding them.
    pub fn from_env() -> Self {
        Settings {
            home: std::env::var("PYPORT_PYTHONHOME").unwrap_or_else(|_| BUILD_HOME.to_string()),
            executable: std::env::var("PYPORT_PYTHON").unwrap_or_else(|_| BUILD_EXECUTABLE.to_string()),
        }
    }
}

/// Initialises Python once for this process, registers the built-in `erlang` module and
/// leaves the GIL released for the worker threads.
pub fn initialize(settings: &Settings) -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = unsafe { initialize_once(settings) });
    result
}

unsafe fn initialize_once(settings: &Settings) -> Result<(), String> {
    pyo3::append_to_inittab!(erlang_module);

    let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::zeroed();
    ffi::PyConfig_InitPythonConfig(config.as_mut_ptr());
    let mut config = config.assume_init();
    // The port has no terminal and no signals of its own to take: Erlang owns the process.
    config.install_signal_handlers = 0;
    // Unbuffered, so that output written just before a crash still reaches the log.
    config.buffered_stdio = 0;
    config.parse_argv = 0;

    let status = set_string(&mut config, |c| &mut c.home, &settings.home)
        .and_then(|_| set_string(&mut config, |c| &mut c.program_name, &settings.executable))
        .and_then(|_| set_string(&mut config, |c| &mut c.executable, &settings.executable))
        .and_then(|_| check(ffi::Py_InitializeFromConfig(&config)));
    ffi::PyConfig_Clear(&mut config);
    status?;
    // The initialising thread holds the GIL; hand it over to the workers.
    ffi::PyEval_SaveThread();
    Ok(())
}

unsafe fn set_string(
    config: &mut ffi::PyConfig,
    field: impl Fn(&mut ffi::PyConfig) -> &mut *mut libc::wchar_t,
    value: &str,
) -> Result<(), String> {
    let c = CString::new(value).map_err(|_| format!("NUL byte in Python setting {value:?}"))?;
    let config_ptr: *mut ffi::PyConfig = config;
    let field_ptr: *mut *mut libc::wchar_t = field(&mut *config_ptr);
    check(ffi::PyConfig_SetBytesString(config_ptr, field_ptr.cast(), c.as_ptr()))
}

unsafe fn check(status: ffi::PyStatus) -> Result<(), String> {
    if ffi::PyStatus_Exception(status) == 0 {
        return Ok(());
    }
    let msg = if status.err_msg.is_null() {
        "unknown error".to_string()
    } else {
        CStr::from_ptr(status.err_msg).to_string_lossy().into_owned()
    };
    Err(format!("Python initialisation failed: {msg} (exit code {})", status.exitcode))
}

use crate::pymodule::erlang as erlang_module;

/// Python's default recursion limit (1000) cannot pickle a value nested 1000 levels deep
/// (pickle recurses about twice per level), yet that is the bridge's nesting limit. Worker
/// threads have 16 MiB stacks, so a higher limit is safe there.
pub const RECURSION_LIMIT: i64 = 3000;

pub fn raise_recursion_limit() -> Result<(), String> {
    use pyo3::prelude::*;
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

/// Adds the directories of `PYPORT_SITE_PACKAGES` (colon-separated; the Erlang side sets it
/// for a virtualenv) with `site.addsitedir`, so that their `.pth` files are processed too.
pub fn add_site_dirs_from_env() -> Result<(), String> {
    use pyo3::prelude::*;
    let Ok(dirs) = std::env::var("PYPORT_SITE_PACKAGES") else { return Ok(()) };
    pyo3::Python::attach(|py| -> pyo3::PyResult<()> {
        let site = py.import("site")?;
        for dir in dirs.split(':').filter(|d| !d.is_empty()) {
            site.call_method1("addsitedir", (dir,))?;
        }
        Ok(())
    })
    .map_err(|e| format!("cannot add the site directories {dirs:?}: {e}"))
}

/// For unit tests: initialise with the build-time settings (no stdio changes).
#[cfg(test)]
pub fn init_for_tests() {
    if let Err(e) = initialize(&Settings::from_env()) {
        panic!("{e}");
    }
}
