//! Conversions beyond the core types: numeric objects (numpy scalars and arrays, anything
//! with `__index__`), dates and times, `Decimal`, `UUID`, Elixir's calendar and Decimal
//! structs, and what Python's `None` becomes.
//!
//! Python → Erlang: `convert` asks `to_erlang` about any object it has no mapping for. The
//! Python helper `_to_erlang` answers with plain values (numbers, lists) or with a tag and
//! fields, written as `{'$pyport_<tag>', Field...}`; the tags are a fixed list here, so
//! nothing Python chooses becomes an atom.
//!
//! Erlang → Python: those tagged tuples, and maps whose `__struct__` is `Elixir.Date`,
//! `Elixir.Time`, `Elixir.NaiveDateTime`, `Elixir.DateTime` or `Elixir.Decimal`, become the
//! Python objects again (`from_tagged`, `from_struct`).

use crate::etf;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyString, PyTuple};
use std::sync::OnceLock;

static NONE_AS: OnceLock<&'static str> = OnceLock::new();

/// Chooses the atom Python's `None` becomes (`--none-as`); once, before Python starts.
pub fn set_none_as(atom: &str) {
    let chosen = match atom {
        "nil" => "nil",
        "none" => "none",
        _ => "undefined",
    };
    let _ = NONE_AS.set(chosen);
}

/// The atom written for `None`: `undefined` unless `--none-as nil` or `--none-as none`.
pub fn none_atom() -> &'static str {
    NONE_AS.get().copied().unwrap_or("undefined")
}

struct Helpers {
    to_erlang: Py<PyAny>,
    from_tagged: Py<PyAny>,
    from_struct: Py<PyAny>,
}

static HELPERS: PyOnceLock<Helpers> = PyOnceLock::new();

fn helpers(py: Python<'_>) -> PyResult<&Helpers> {
    HELPERS.get_or_try_init(py, || {
        let m = py.import("erlang")?;
        Ok(Helpers {
            to_erlang: m.getattr("_to_erlang")?.unbind(),
            from_tagged: m.getattr("_from_tagged")?.unbind(),
            from_struct: m.getattr("_from_struct")?.unbind(),
        })
    })
}

/// What to write for an object `convert` has no mapping for.
pub enum Converted<'py> {
    /// Not a type this module knows: `{python_object, ...}`.
    Unknown,
    /// Encode this (plain) value instead.
    Plain(Bound<'py, PyAny>),
    /// Write `{Atom, Field...}`.
    Tagged(&'static str, Bound<'py, PyTuple>),
}

/// Asks the Python helper about `obj`.
pub fn to_erlang<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Converted<'py>> {
    let py = obj.py();
    let answer = helpers(py)?.to_erlang.bind(py).call1((obj,))?;
    if answer.is_none() {
        return Ok(Converted::Unknown);
    }
    let pair = answer.cast_into::<PyTuple>()?;
    let tag = pair.get_item(0)?;
    let value = pair.get_item(1)?;
    if tag.is_none() {
        return Ok(Converted::Plain(value));
    }
    let tag: String = tag.extract()?;
    let fields = value.cast_into::<PyTuple>()?;
    match tag_atom(&tag) {
        Some(atom) => Ok(Converted::Tagged(atom, fields)),
        None => Ok(Converted::Unknown),
    }
}

/// The atom of a tag; the only atoms this module writes.
fn tag_atom(tag: &str) -> Option<&'static str> {
    match tag {
        "date" => Some("$pyport_date"),
        "time" => Some("$pyport_time"),
        "datetime" => Some("$pyport_datetime"),
        "timedelta" => Some("$pyport_timedelta"),
        "decimal" => Some("$pyport_decimal"),
        "uuid" => Some("$pyport_uuid"),
        _ => None,
    }
}

/// Writes the atom of a tagged value (kept as literals so the atom list can be checked).
pub fn put_tag(out: &mut Vec<u8>, atom: &'static str) {
    match atom {
        "$pyport_date" => etf::put_atom(out, "$pyport_date"),
        "$pyport_time" => etf::put_atom(out, "$pyport_time"),
        "$pyport_datetime" => etf::put_atom(out, "$pyport_datetime"),
        "$pyport_timedelta" => etf::put_atom(out, "$pyport_timedelta"),
        "$pyport_decimal" => etf::put_atom(out, "$pyport_decimal"),
        _ => etf::put_atom(out, "$pyport_uuid"),
    }
}

/// A decoded tuple whose first item is a `'$pyport_<tag>'` atom (now a str): the Python
/// object, or `None` when it is an ordinary tuple.
pub fn from_tagged<'py>(tuple: &Bound<'py, PyTuple>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let Ok(first) = tuple.get_item(0) else { return Ok(None) };
    let Ok(name) = first.cast::<PyString>() else { return Ok(None) };
    if !name.to_str().is_ok_and(|s| s.starts_with("$pyport_")) {
        return Ok(None);
    }
    let py = tuple.py();
    let obj = helpers(py)?.from_tagged.bind(py).call1((tuple,))?;
    Ok((!obj.is_none()).then_some(obj))
}

/// A decoded map with a `__struct__` key: the Python object for the Elixir structs this
/// module knows, `None` for other maps.
pub fn from_struct<'py>(dict: &Bound<'py, PyDict>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = dict.py();
    if dict.get_item(pyo3::intern!(py, "__struct__"))?.is_none() {
        return Ok(None);
    }
    let obj = helpers(py)?.from_struct.bind(py).call1((dict,))?;
    Ok((!obj.is_none()).then_some(obj))
}

const RICHTYPES_PY: &std::ffi::CStr = cr#"
import datetime as _dt
import decimal as _decimal
import operator as _operator
import uuid as _uuid

_NUMERIC_KINDS = frozenset("biuf")


def _offset(value):
    off = value.utcoffset()
    if off is None:
        return None
    return off.days * 86400 + off.seconds


def _to_erlang(obj):
    """(None, plain value) or (tag, fields) for the types pyport converts beyond the core
    ones; None for anything else."""
    if isinstance(obj, _dt.datetime):
        return "datetime", (((obj.year, obj.month, obj.day), (obj.hour, obj.minute, obj.second)),
                            obj.microsecond, _offset(obj))
    if isinstance(obj, _dt.date):
        return "date", ((obj.year, obj.month, obj.day),)
    if isinstance(obj, _dt.time):
        return "time", ((obj.hour, obj.minute, obj.second), obj.microsecond, _offset(obj))
    if isinstance(obj, _dt.timedelta):
        return "timedelta", (obj.days, obj.seconds, obj.microseconds)
    if isinstance(obj, _decimal.Decimal):
        return "decimal", (str(obj),)
    if isinstance(obj, _uuid.UUID):
        return "uuid", (str(obj),)
    dtype = getattr(obj, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", None) in _NUMERIC_KINDS and hasattr(obj, "tolist"):
        # numpy scalars and arrays (and look-alikes): numbers, booleans, nested lists.
        return None, obj.tolist()
    if hasattr(type(obj), "__index__"):
        return None, _operator.index(obj)
    return None


def _tz(offset):
    return None if offset is None else _dt.timezone(_dt.timedelta(seconds=offset))


def _from_tagged(t):
    tag = t[0]
    try:
        if tag == "$pyport_date" and len(t) == 2:
            return _dt.date(*t[1])
        if tag == "$pyport_time" and len(t) == 4:
            return _dt.time(*t[1], t[2], tzinfo=_tz(t[3]))
        if tag == "$pyport_datetime" and len(t) == 4:
            (d, tm) = t[1]
            return _dt.datetime(*d, *tm, t[2], tzinfo=_tz(t[3]))
        if tag == "$pyport_timedelta" and len(t) == 4:
            return _dt.timedelta(days=t[1], seconds=t[2], microseconds=t[3])
        if tag == "$pyport_decimal" and len(t) == 2:
            return _decimal.Decimal(t[1])
        if tag == "$pyport_uuid" and len(t) == 2:
            return _uuid.UUID(t[1])
    except (TypeError, ValueError, _decimal.InvalidOperation) as e:
        raise ValueError("malformed %s term: %r (%s)" % (tag, t, e)) from None
    return None


def _micro(value):
    # Elixir keeps {microseconds, precision}.
    return value[0] if isinstance(value, tuple) else (value or 0)


def _from_struct(m):
    kind = m.get("__struct__")
    if kind == "Elixir.Date":
        return _dt.date(m["year"], m["month"], m["day"])
    if kind == "Elixir.Time":
        return _dt.time(m["hour"], m["minute"], m["second"], _micro(m.get("microsecond")))
    if kind == "Elixir.NaiveDateTime":
        return _dt.datetime(m["year"], m["month"], m["day"], m["hour"], m["minute"],
                            m["second"], _micro(m.get("microsecond")))
    if kind == "Elixir.DateTime":
        offset = (m.get("utc_offset") or 0) + (m.get("std_offset") or 0)
        return _dt.datetime(m["year"], m["month"], m["day"], m["hour"], m["minute"],
                            m["second"], _micro(m.get("microsecond")), tzinfo=_tz(offset))
    if kind == "Elixir.Decimal":
        sign = 0 if m.get("sign", 1) == 1 else 1
        coef = m["coef"]
        if coef == "inf":
            return _decimal.Decimal("-Infinity" if sign else "Infinity")
        if coef in ("NaN", "qNaN", "sNaN"):
            return _decimal.Decimal("NaN")
        return _decimal.Decimal((sign, tuple(int(c) for c in str(coef)), m["exp"]))
    return None
"#;

/// Adds the helpers to the `erlang` module.
pub fn register(m: &Bound<'_, pyo3::types::PyModule>) -> PyResult<()> {
    m.py().run(RICHTYPES_PY, Some(&m.dict()), None)
}
