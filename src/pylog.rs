//! Python `logging` records to Erlang's `logger`.
//!
//! At start-up the port puts one handler on Python's root logger. It formats each record
//! (message, and the traceback of `logger.exception(...)`, as one text: one event in Erlang)
//! and sends a `pyport_log_record` frame with the level, logger name, module, line and, when
//! the record was made while serving a request, the pid of the Erlang process that made the
//! request. Threads started during a request inherit that pid.
//!
//! `logging.basicConfig()` only configures a root logger that has no handlers, so the
//! installed `basicConfig` first takes our handler off: a user's own configuration replaces
//! ours, exactly as it would in a plain interpreter.
//!
//! Records share one token bucket (the `--log-lines-per-sec` rate, bursts of twice that);
//! what the bucket refuses is counted and reported in a later warning.

use crate::framing::Outbox;
use crate::protocol::{self, Owner};
use parking_lot::Mutex;
use pyo3::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;

/// Longest message forwarded (a traceback included); longer ones are cut and say so.
pub const MAX_RECORD: usize = 64 * 1024;

thread_local! {
    /// The Erlang process whose request this thread is running (or was started by).
    static CALLER: RefCell<Option<Owner>> = const { RefCell::new(None) };
}

struct Sink {
    out: Outbox,
    bucket: Mutex<Bucket>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Where records go, and how many per second; called once before Python starts.
pub fn install(out: Outbox, lines_per_sec: f64) {
    let _ = SINK.set(Sink { out, bucket: Mutex::new(Bucket::new(lines_per_sec)) });
}

/// The Erlang process whose request the current code runs for, if any: the thread's (a
/// worker's request, or the request that started the thread), else the task's (a coroutine
/// on the event loop, and the tasks it made, see [`task_context`]).
pub fn current_caller(py: Python<'_>) -> Option<Owner> {
    CALLER.with(|c| c.borrow().clone()).or_else(|| task_caller(py))
}

/// `erlang._caller`, the context variable that carries a coroutine's caller.
static CALLER_VAR: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();

fn caller_var(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    CALLER_VAR
        .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            let var = py.import("contextvars")?.getattr("ContextVar")?.call1(("pyport_caller",))?;
            Ok(var.unbind())
        })
        .map(|v| v.bind(py))
}

fn task_caller(py: Python<'_>) -> Option<Owner> {
    let value = caller_var(py).ok()?.call_method1("get", (py.None(),)).ok()?;
    value.cast::<Caller>().ok().map(|c| c.get().0.clone())
}

/// A copy of the current context in which the caller is `owner`: a task run in it (and the
/// tasks it creates, which copy it) acts for `owner` (`erlang.self()`, log records, callbacks).
pub fn task_context<'py>(py: Python<'py>, owner: Option<&Owner>) -> PyResult<Bound<'py, PyAny>> {
    let ctx = py.import("contextvars")?.call_method0("copy_context")?;
    if let Some(owner) = owner {
        let set = caller_var(py)?.getattr("set")?;
        ctx.call_method1("run", (set, Caller(owner.clone())))?;
    }
    Ok(ctx)
}

/// Marks the current thread as serving `owner`'s request until the guard is dropped.
pub struct CallerGuard(Option<Owner>);

impl CallerGuard {
    pub fn set(owner: &Owner) -> CallerGuard {
        CallerGuard(CALLER.with(|c| c.replace(Some(owner.clone()))))
    }
}

impl Drop for CallerGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        CALLER.with(|c| {
            c.replace(previous);
        });
    }
}

/// A token bucket with a count of what it refused.
pub struct Bucket {
    rate: f64,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Bucket {
    pub fn new(rate: f64) -> Bucket {
        Bucket { rate, tokens: 2.0 * rate, refilled: Instant::now(), suppressed: 0 }
    }

    /// Takes a token. `Ok(n)`: allowed, and `n` earlier records were refused since the
    /// last allowed one; `Err(())`: refused (and counted).
    pub fn take(&mut self) -> Result<u64, ()> {
        let now = Instant::now();
        let gained = now.duration_since(self.refilled).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + gained).min(2.0 * self.rate);
        self.refilled = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return Err(());
        }
        self.tokens -= 1.0;
        Ok(std::mem::take(&mut self.suppressed))
    }
}

/// Erlang logger level of a Python level number.
pub fn level_name(levelno: i64) -> &'static str {
    match levelno {
        i64::MIN..=10 => "debug",
        11..=20 => "info",
        21..=30 => "warning",
        31..=40 => "error",
        _ => "critical",
    }
}

/// Cuts `msg` to at most `max` bytes on a character boundary, saying how much was cut.
pub fn cut(msg: &str, max: usize) -> String {
    if msg.len() <= max {
        return msg.to_string();
    }
    let mut end = max.saturating_sub(40);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes cut]", &msg[..end], msg.len() - end)
}

/// The caller of the current thread, as an opaque object Python code can hand to a thread.
#[pyclass(frozen, module = "erlang", name = "_Caller")]
pub struct Caller(Owner);

/// The Erlang process whose request the current thread runs, or None.
#[pyfunction]
fn _current_caller(py: Python<'_>) -> Option<Caller> {
    current_caller(py).map(Caller)
}

/// Makes the current thread (a thread started by a request) act for `caller`.
#[pyfunction]
#[pyo3(signature = (caller))]
fn _adopt_caller(caller: Option<&Bound<'_, Caller>>) {
    let owner = caller.map(|c| c.get().0.clone());
    CALLER.with(|c| *c.borrow_mut() = owner);
}

/// Sends one formatted record to Erlang (rate limited). Never raises.
#[pyfunction]
fn _emit(py: Python<'_>, levelno: i64, logger: &str, module: &str, line: i64, message: &str) {
    let Some(sink) = SINK.get() else { return };
    let suppressed = match sink.bucket.lock().take() {
        Ok(n) => n,
        Err(()) => return,
    };
    if suppressed > 0 {
        let note = format!("{suppressed} Python log records suppressed (rate limit)");
        sink.out.log("warning", "pyport", note.as_bytes());
    }
    let caller = current_caller(py);
    let msg = cut(message, MAX_RECORD);
    sink.out.send(protocol::log_record_frame(level_name(levelno), logger, module, line, caller.as_ref(), msg.as_bytes()));
}

/// The Python half: the handler, its installation on the root logger, `basicConfig`, and
/// caller inheritance for threads.
const LOGGING_PY: &std::ffi::CStr = cr#"
import logging as _logging
import threading as _threading
import functools as _functools

class LogHandler(_logging.Handler):
    """Sends each record to Erlang's logger (installed on the root logger by pyport)."""

    def __init__(self, level=_logging.NOTSET):
        super().__init__(level)
        self.setFormatter(_logging.Formatter("%(message)s"))

    def emit(self, record):
        try:
            msg = self.format(record)
            _emit(record.levelno, str(record.name), str(record.module), int(record.lineno or 0), msg)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

_handler = None


def _configure_logging(level, fmt):
    # The root logger's level, and the format of the records pyport forwards.
    _logging.getLogger().setLevel(level)
    if _handler is not None:
        _handler.setFormatter(_logging.Formatter(fmt or "%(message)s"))


def _install_logging(level, fmt):
    global _handler
    root = _logging.getLogger()
    if any(isinstance(h, LogHandler) for h in root.handlers):
        return
    handler = _handler = LogHandler()
    root.addHandler(handler)
    _configure_logging(level, fmt)
    original = _logging.basicConfig

    @_functools.wraps(original)
    def basicConfig(**kwargs):
        # basicConfig() does nothing when the root logger has handlers: let the user's
        # configuration replace ours, as it would in a plain interpreter.
        if handler in root.handlers:
            root.removeHandler(handler)
        return original(**kwargs)

    _logging.basicConfig = basicConfig

    start = _threading.Thread.start

    @_functools.wraps(start)
    def start_with_caller(self, *args, **kwargs):
        caller = _current_caller()
        if caller is not None:
            run = self.run

            def run_for_caller():
                _adopt_caller(caller)
                run()

            self.run = run_for_caller
        return start(self, *args, **kwargs)

    _threading.Thread.start = start_with_caller
"#;

/// Adds the logging functions and `LogHandler` to the `erlang` module.
pub fn register(m: &Bound<'_, pyo3::types::PyModule>) -> PyResult<()> {
    use pyo3::types::PyModuleMethods;
    m.add_class::<Caller>()?;
    m.add_function(wrap_pyfunction!(_current_caller, m)?)?;
    m.add_function(wrap_pyfunction!(_adopt_caller, m)?)?;
    m.add_function(wrap_pyfunction!(_emit, m)?)?;
    m.py().run(LOGGING_PY, Some(&m.dict()), None)
}

/// Puts the handler on the root logger, with the root logger's `level` and the records'
/// `format`; called once after Python has started.
pub fn install_handler(level: u64, format: Option<&str>) -> Result<(), String> {
    Python::attach(|py| -> PyResult<()> {
        py.import("erlang")?.call_method1("_install_logging", (level, format))?;
        Ok(())
    })
    .map_err(|e| format!("cannot install the Python logging handler: {e}"))
}

/// `py:configure_logging`: the root logger's level and the format of forwarded records.
pub fn configure(py: Python<'_>, level: u64, format: Option<&str>) -> PyResult<()> {
    py.import("erlang")?.call_method1("_configure_logging", (level, format))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_like_python_names() {
        assert_eq!(level_name(0), "debug");
        assert_eq!(level_name(10), "debug");
        assert_eq!(level_name(20), "info");
        assert_eq!(level_name(25), "warning");
        assert_eq!(level_name(30), "warning");
        assert_eq!(level_name(40), "error");
        assert_eq!(level_name(50), "critical");
        assert_eq!(level_name(-5), "debug");
    }

    #[test]
    fn cut_keeps_characters_whole() {
        let long = "é".repeat(100);
        let c = cut(&long, 61);
        assert!(c.len() <= 61 + 30);
        assert!(c.ends_with("bytes cut]"));
        assert_eq!(cut("short", 61), "short");
    }

    #[test]
    fn bucket_refuses_then_counts() {
        let mut b = Bucket::new(1.0);
        assert_eq!(b.take(), Ok(0));
        assert_eq!(b.take(), Ok(0));
        assert_eq!(b.take(), Err(()));
        assert_eq!(b.take(), Err(()));
        b.tokens = 1.0;
        assert_eq!(b.take(), Ok(2));
    }
}
