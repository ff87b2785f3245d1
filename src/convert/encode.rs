//! Python objects to ETF.

use super::{enter, truncate, ConvertError, Result};
use crate::etf::{self, Limits, MAX_DEPTH};
use crate::protocol::{Handle, HANDLE_TAG};
use crate::pymodule::{handle_of, OpaqueTerm};
use crate::richtypes;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple,
    PyType,
};
use std::cell::RefCell;
use std::collections::HashSet;

/// Appends the external format of `obj` (no version byte) to `out`.
pub fn encode(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<()> {
    encode_term(obj, out, 0)
}

/// A complete versioned term, as `term_to_binary/1` would produce.
#[cfg(test)]
pub fn encode_versioned(obj: &Bound<'_, PyAny>) -> Result<Vec<u8>> {
    let mut out = vec![etf::VERSION];
    encode(obj, &mut out)?;
    Ok(out)
}

/// Most objects crossing the bridge are of a handful of exact builtin types; checking those
/// by type pointer first keeps the common path free of subclass checks.
fn encode_term(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> Result<()> {
    let py = obj.py();
    if obj.is_none() {
        etf::put_atom(out, richtypes::none_atom());
    } else if let Ok(b) = obj.cast_exact::<PyBool>() {
        etf::put_atom(out, if b.is_true() { "true" } else { "false" });
    } else if let Ok(s) = obj.cast::<PyString>() {
        match s.to_str() {
            Ok(text) => etf::put_binary(out, text.as_bytes()),
            // Lone surrogates cannot be UTF-8; say so rather than guess.
            Err(e) => return Err(e.into()),
        }
    } else if let Ok(i) = obj.cast::<PyInt>() {
        encode_int(i, out)?;
    } else if let Ok(f) = obj.cast::<PyFloat>() {
        encode_float(f.value(), out);
    } else if let Ok(l) = obj.cast::<PyList>() {
        let depth = enter(depth, MAX_DEPTH)?;
        encode_list(l, out, depth)?;
    } else if let Ok(t) = obj.cast::<PyTuple>() {
        let depth = enter(depth, MAX_DEPTH)?;
        etf::put_tuple_header(out, t.len());
        for item in t.iter() {
            encode_term(&item, out, depth)?;
        }
    } else if let Ok(d) = obj.cast::<PyDict>() {
        let depth = enter(depth, MAX_DEPTH)?;
        encode_dict(d, out, depth)?;
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        etf::put_binary(out, b.as_bytes());
    } else if let Ok(b) = obj.cast::<PyByteArray>() {
        etf::put_binary(out, &b.to_vec());
    } else if let Ok(t) = obj.cast::<OpaqueTerm>() {
        out.extend_from_slice(t.get().bytes());
    } else if let Some(h) = handle_of(obj) {
        put_handle(out, &h);
    } else if obj.cast::<PySet>().is_ok() || obj.cast::<PyFrozenSet>().is_ok() {
        let depth = enter(depth, MAX_DEPTH)?;
        let items: Vec<Bound<'_, PyAny>> = obj.try_iter()?.collect::<PyResult<_>>()?;
        encode_seq(py, &items, out, depth)?;
    } else {
        encode_other(obj, out, depth)?;
    }
    Ok(())
}

fn encode_int(i: &Bound<'_, PyInt>, out: &mut Vec<u8>) -> Result<()> {
    if let Ok(v) = i.extract::<i64>() {
        etf::put_i64(out, v);
        return Ok(());
    }
    let negative = i.lt(0)?;
    let magnitude = i.abs()?;
    let bits: usize = magnitude.call_method0("bit_length")?.extract()?;
    let le = magnitude.call_method1("to_bytes", (bits.div_ceil(8), "little"))?;
    etf::put_big(out, negative, le.cast::<PyBytes>()?.as_bytes());
    Ok(())
}

fn encode_float(v: f64, out: &mut Vec<u8>) {
    if v.is_nan() {
        etf::put_atom(out, "nan");
    } else if v == f64::INFINITY {
        etf::put_atom(out, "infinity");
    } else if v == f64::NEG_INFINITY {
        etf::put_atom(out, "neg_infinity");
    } else {
        etf::put_f64(out, v);
    }
}

/// Lists are re-measured while they are written: converting an element can run Python code
/// (a `__repr__`) that lets another thread change the list, so the header's count is patched
/// afterwards rather than trusted.
fn encode_list(l: &Bound<'_, PyList>, out: &mut Vec<u8>, depth: usize) -> Result<()> {
    if l.len() == 0 {
        etf::put_nil(out);
        return Ok(());
    }
    let header_at = out.len();
    etf::put_list_header(out, 0);
    let mut n = 0usize;
    // The length is read again before every item (never by running off the end, which
    // would build an IndexError per list).
    while n < l.len() {
        encode_term(&l.get_item(n)?, out, depth)?;
        n += 1;
    }
    if n == 0 {
        out.truncate(header_at);
        etf::put_nil(out);
    } else {
        out[header_at + 1..header_at + 5].copy_from_slice(&(n as u32).to_be_bytes());
        etf::put_nil(out);
    }
    Ok(())
}

fn encode_seq(_py: Python<'_>, items: &[Bound<'_, PyAny>], out: &mut Vec<u8>, depth: usize) -> Result<()> {
    if !items.is_empty() {
        etf::put_list_header(out, items.len());
        for item in items {
            encode_term(item, out, depth)?;
        }
    }
    etf::put_nil(out);
    Ok(())
}

/// Dicts are walked with `PyDict_Next` on strong references and checked for size changes, so
/// a dict mutated during conversion yields an error instead of a panic or a torn map.
/// Keys that are all `str` cannot collide once encoded; otherwise (`'a'` and `b'a'` both
/// become `<<"a">>`) encoded keys are compared.
fn encode_dict(d: &Bound<'_, PyDict>, out: &mut Vec<u8>, depth: usize) -> Result<()> {
    let py = d.py();
    let len = d.len();
    etf::put_map_header(out, len);
    let spans = KeySpans::open();
    let mut all_str = true;
    let mut pos: ffi::Py_ssize_t = 0;
    let mut count = 0usize;
    loop {
        let mut k: *mut ffi::PyObject = std::ptr::null_mut();
        let mut v: *mut ffi::PyObject = std::ptr::null_mut();
        // SAFETY: we hold the GIL; `d` is a live dict; the borrowed references are turned
        // into strong ones before any Python code can run.
        let (key, value) = unsafe {
            if ffi::PyDict_Next(d.as_ptr(), &mut pos, &mut k, &mut v) == 0 {
                break;
            }
            (Bound::from_borrowed_ptr(py, k), Bound::from_borrowed_ptr(py, v))
        };
        count += 1;
        if count > len || d.len() != len {
            return Err(ConvertError::Unsupported("dict changed size during conversion".into()));
        }
        all_str &= key.is_exact_instance_of::<PyString>();
        let key_start = out.len();
        encode_term(&key, out, depth)?;
        spans.push(key_start, out.len());
        encode_term(&value, out, depth)?;
        if d.len() != len {
            return Err(ConvertError::Unsupported("dict changed size during conversion".into()));
        }
    }
    if count != len {
        return Err(ConvertError::Unsupported("dict changed size during conversion".into()));
    }
    // Distinct str keys always encode to distinct binaries; other keys may collide, with each
    // other or with a str (`'a'` and `b'a'` both become <<"a">>): only then are they compared.
    if !all_str {
        spans.check_distinct(out)?;
    }
    Ok(())
}

thread_local! {
    /// Where in the output the keys of the dicts being encoded on this thread lie, innermost
    /// dict last. One vector per thread, reused, so that encoding a dict allocates nothing
    /// for its keys (it did, for every dict, when each kept its own).
    static KEY_SPANS: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
}

/// One dict's share of [`KEY_SPANS`]: the entries from `base` on. Dropping it (also on an
/// error) gives them back. Borrows are never held across encoding, which can run Python code
/// that encodes on this thread too (a `__repr__` sending a message): such a nested encode
/// pushes above this dict's entries and gives them back before this one continues.
struct KeySpans {
    base: usize,
}

impl KeySpans {
    fn open() -> KeySpans {
        KeySpans { base: KEY_SPANS.with(|s| s.borrow().len()) }
    }

    fn push(&self, start: usize, end: usize) {
        KEY_SPANS.with(|s| s.borrow_mut().push((start, end)));
    }

    /// Fails on the first key, of this dict's keys in `out`, that was seen before.
    fn check_distinct(&self, out: &[u8]) -> Result<()> {
        KEY_SPANS.with(|s| {
            let spans = s.borrow();
            let mine = spans.get(self.base..).unwrap_or_default();
            let mut seen = HashSet::with_capacity(mine.len());
            for &(a, b) in mine {
                if !seen.insert(&out[a..b]) {
                    return Err(ConvertError::DuplicateKey(describe_key(&out[a..b])));
                }
            }
            Ok(())
        })
    }
}

impl Drop for KeySpans {
    fn drop(&mut self) {
        KEY_SPANS.with(|s| s.borrow_mut().truncate(self.base));
    }
}

/// A readable rendering of an encoded key for the duplicate-key error.
fn describe_key(bytes: &[u8]) -> String {
    let mut versioned = vec![etf::VERSION];
    versioned.extend_from_slice(bytes);
    // Validate before eetf sees the bytes (a match guard would run after the decode).
    if etf::validate(&versioned, Limits::ENVELOPE).is_err() {
        return format!("<{} bytes>", bytes.len());
    }
    match eetf::Term::decode(&versioned[..]) {
        Ok(t) => truncate(t.to_string(), 200),
        Err(_) => format!("<{} bytes>", bytes.len()),
    }
}

fn put_handle(out: &mut Vec<u8>, h: &Handle) {
    etf::put_tuple_header(out, 4);
    etf::put_atom(out, HANDLE_TAG);
    etf::put_u64(out, h.generation);
    etf::put_u64(out, h.id);
    etf::put_binary(out, &h.token);
}

/// A class's module-qualified name (`decimal.Decimal`, `__main__.Thing`); builtins unqualified.
pub fn type_name(ty: &Bound<'_, PyType>) -> String {
    let module: String = ty.module().map(|m| m.to_string()).unwrap_or_default();
    let qualname: String = ty.qualname().map(|q| q.to_string()).unwrap_or_else(|_| "?".into());
    if module.is_empty() || module == "builtins" {
        qualname
    } else {
        format!("{module}.{qualname}")
    }
}

/// Numeric objects, dates, times, `Decimal`, `UUID` (see `richtypes`); anything else is
/// `{python_object, TypeName, Repr}`, also when asking about it raised.
fn encode_other(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> Result<()> {
    match richtypes::to_erlang(obj) {
        Ok(richtypes::Converted::Plain(value)) => {
            // The replacement may itself need converting: count it as a level of nesting.
            let depth = enter(depth, MAX_DEPTH)?;
            encode_term(&value, out, depth)
        }
        Ok(richtypes::Converted::Tagged(atom, fields)) => {
            let depth = enter(depth, MAX_DEPTH)?;
            etf::put_tuple_header(out, fields.len() + 1);
            richtypes::put_tag(out, atom);
            for field in fields.iter() {
                encode_term(&field, out, depth)?;
            }
            Ok(())
        }
        Ok(richtypes::Converted::Unknown) | Err(_) => encode_unknown(obj, out),
    }
}

/// Objects with no mapping become `{python_object, TypeName, Repr}`.
fn encode_unknown(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<()> {
    let type_name = type_name(&obj.get_type());
    let repr = match obj.repr() {
        Ok(r) => r.to_string_lossy().into_owned(),
        Err(_) => format!("<{type_name} object (repr failed)>"),
    };
    etf::put_tuple_header(out, 3);
    etf::put_atom(out, "python_object");
    etf::put_binary(out, type_name.as_bytes());
    etf::put_binary(out, truncate(repr, 4096).as_bytes());
    Ok(())
}
