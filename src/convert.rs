//! Conversion between ETF bytes and Python objects, with no intermediate term tree.
//!
//! Going straight from bytes to objects (and back) avoids `eetf`'s node-per-term tree and its
//! binary copies, and keeps its encoder's defects (small-integer lists written as
//! STRING_EXT, corrupted long ByteLists) off every path that carries user data.
//! The table implemented here is documented in docs/PROTOCOL.md and the README.

use crate::etf::{self, Limits, Reader, TermError, MAX_DEPTH};
use crate::protocol::{Handle, BYTES_TAG, HANDLE_TAG};
use crate::pymodule::{handle_of, OpaqueTerm, SharedDictHandle};
use crate::richtypes;
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple,
    PyType,
};
use std::collections::HashSet;

/// Why a value could not be converted.
#[derive(Debug)]
pub enum ConvertError {
    Term(TermError),
    /// Two keys that differ on one side are equal on the other.
    DuplicateKey(String),
    /// Valid input with no faithful counterpart (e.g. an unhashable map key).
    Unsupported(String),
    Python(PyErr),
}

impl ConvertError {
    /// As a Python exception: Python errors as they were, the others as ValueError.
    pub fn into_pyerr(self) -> PyErr {
        match self {
            ConvertError::Python(e) => e,
            ConvertError::Term(t) => pyo3::exceptions::PyValueError::new_err(t.to_string()),
            ConvertError::DuplicateKey(k) => {
                pyo3::exceptions::PyValueError::new_err(format!("two keys become the same key {k}"))
            }
            ConvertError::Unsupported(m) => pyo3::exceptions::PyValueError::new_err(m),
        }
    }
}

impl From<TermError> for ConvertError {
    fn from(e: TermError) -> Self {
        ConvertError::Term(e)
    }
}

impl From<PyErr> for ConvertError {
    fn from(e: PyErr) -> Self {
        ConvertError::Python(e)
    }
}

impl From<std::convert::Infallible> for ConvertError {
    fn from(e: std::convert::Infallible) -> Self {
        match e {}
    }
}

impl From<pyo3::CastError<'_, '_>> for ConvertError {
    fn from(e: pyo3::CastError<'_, '_>) -> Self {
        ConvertError::Python(e.into())
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

// ---------------------------------------------------------------------------------------
// ETF → Python

/// Decodes a complete versioned term into a Python object.
pub fn decode<'py>(py: Python<'py>, bytes: &[u8]) -> Result<Bound<'py, PyAny>> {
    decode_wrapped(py, bytes, 0)
}

/// Like [`decode`], for a payload whose outer `wrapper_levels` containers are protocol, not
/// user data (`{Args, Kwargs}` of a call is two, a Locals map one): the nesting limit is
/// the user's, so those levels are not counted against it.
pub fn decode_wrapped<'py>(py: Python<'py>, bytes: &[u8], wrapper_levels: usize) -> Result<Bound<'py, PyAny>> {
    let _gc = GcPause::new(py);
    let mut r = Reader::new(bytes);
    r.expect_version()?;
    let mut d = Decoder { py, limit: MAX_DEPTH + wrapper_levels, strings: StrCache::new(py) };
    let v = decode_term(&mut d, &mut r, 0)?;
    r.expect_end()?;
    Ok(v)
}

/// Pauses Python's cyclic garbage collector while a payload is being built.
///
/// Decoding allocates thousands of containers that cannot form cycles; each 700 of them
/// would otherwise trigger a collection that traverses every young object (a 100 KB nested
/// map decoded about 2x slower with the collector running). Decoding runs no Python code and
/// never releases the GIL, so no other thread observes the pause; the previous state is
/// restored on every exit path.
struct GcPause {
    was_enabled: bool,
}

impl GcPause {
    fn new(_py: Python<'_>) -> Self {
        // SAFETY: the GIL is held (witnessed by `_py`).
        GcPause { was_enabled: unsafe { ffi::PyGC_Disable() } != 0 }
    }
}

impl Drop for GcPause {
    fn drop(&mut self) {
        if self.was_enabled {
            // SAFETY: still under the same GIL hold as `new`.
            unsafe {
                ffi::PyGC_Enable();
            }
        }
    }
}

fn enter(depth: usize, limit: usize) -> Result<usize> {
    if depth + 1 > limit {
        Err(TermError::TooDeep(MAX_DEPTH).into())
    } else {
        Ok(depth + 1)
    }
}

/// Decoding state: the interpreter, the depth limit in force and a cache of short strings.
struct Decoder<'py> {
    py: Python<'py>,
    limit: usize,
    strings: StrCache<'py>,
}

fn decode_term<'py>(d: &mut Decoder<'py>, r: &mut Reader<'_>, depth: usize) -> Result<Bound<'py, PyAny>> {
    let (py, limit) = (d.py, d.limit);
    let start = *r;
    let tag = r.u8()?;
    let obj = match tag {
        etf::SMALL_INTEGER => r.u8()?.into_pyobject(py)?.into_any(),
        etf::INTEGER => r.i32()?.into_pyobject(py)?.into_any(),
        etf::SMALL_BIG => {
            let n = r.u8()? as usize;
            decode_big(py, r, n)?
        }
        etf::LARGE_BIG => {
            let n = r.u32()? as usize;
            decode_big(py, r, n)?
        }
        etf::NEW_FLOAT => PyFloat::new(py, r.f64()?).into_any(),
        etf::FLOAT => PyFloat::new(py, old_float(r.bytes(31)?)?).into_any(),
        etf::ATOM | etf::ATOM_UTF8 | etf::SMALL_ATOM | etf::SMALL_ATOM_UTF8 => {
            let name = r.atom_body(tag)?;
            decode_atom(py, name, matches!(tag, etf::ATOM | etf::SMALL_ATOM))?
        }
        etf::BINARY => {
            let n = r.u32()? as usize;
            d.strings.binary(r.bytes(n)?)
        }
        etf::NIL => {
            // [] is a list like any other: it counts for the nesting limit, as an empty
            // Python list does on the way back.
            enter(depth, limit)?;
            PyList::empty(py).into_any()
        }
        etf::STRING => {
            // Erlang strings are lists of integers; STRING_EXT is just their compact form,
            // and counts as a list for the nesting limit.
            enter(depth, limit)?;
            let n = r.u16()? as usize;
            PyList::new(py, r.bytes(n)?)?.into_any()
        }
        etf::LIST => {
            let depth = enter(depth, limit)?;
            let raw = r.u32()?;
            let n = r.count(raw, 1)?;
            let list = new_list(py, n)?;
            for i in 0..n {
                let item = decode_term(d, r, depth)?;
                // SAFETY: `list` is a fresh list of length n and slot i is empty; SET_ITEM
                // steals the reference that into_ptr hands over.
                unsafe { ffi::PyList_SET_ITEM(list.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr()) };
            }
            if r.u8()? != etf::NIL {
                return Err(TermError::Unsupported("improper list (its tail is not [])").into());
            }
            list.into_any()
        }
        etf::SMALL_TUPLE | etf::LARGE_TUPLE => {
            let depth = enter(depth, limit)?;
            let raw = if tag == etf::SMALL_TUPLE { r.u8()? as u32 } else { r.u32()? };
            let n = r.count(raw, 1)?;
            if let Some(special) = decode_tagged_tuple(py, r, n)? {
                special
            } else {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(decode_term(d, r, depth)?);
                }
                let tuple = PyTuple::new(py, items)?;
                match richtypes::from_tagged(&tuple)? {
                    Some(obj) => obj,
                    None => tuple.into_any(),
                }
            }
        }
        etf::MAP => {
            let depth = enter(depth, limit)?;
            let raw = r.u32()?;
            let n = r.count(raw, 2)?;
            let dict = PyDict::new(py);
            for _ in 0..n {
                let k = decode_term(d, r, depth)?;
                let v = decode_term(d, r, depth)?;
                let before = dict.len();
                if let Err(e) = dict.set_item(&k, v) {
                    if e.is_instance_of::<PyTypeError>(py) {
                        return Err(ConvertError::Unsupported(format!(
                            "map key {} becomes an unhashable Python {}",
                            short_repr(&k),
                            k.get_type().name()?
                        )));
                    }
                    return Err(e.into());
                }
                if dict.len() == before {
                    return Err(ConvertError::DuplicateKey(short_repr(&k)));
                }
            }
            match richtypes::from_struct(&dict)? {
                Some(obj) => obj,
                None => dict.into_any(),
            }
        }
        etf::PID
        | etf::NEW_PID
        | etf::PORT
        | etf::NEW_PORT
        | etf::V4_PORT
        | etf::REFERENCE
        | etf::NEW_REFERENCE
        | etf::NEWER_REFERENCE
        | etf::NEW_FUN
        | etf::EXPORT => {
            *r = start;
            let from = r.pos();
            etf::skip_term(r, depth, Limits { max_depth: limit, max_count: usize::MAX })?;
            let bytes = r.slice(from, r.pos());
            let term = OpaqueTerm::new_checked(bytes).ok_or(TermError::Invalid("malformed opaque term"))?;
            Bound::new(py, term)?.into_any()
        }
        etf::BIT_BINARY => {
            return Err(TermError::Unsupported("bitstring (bit length not a multiple of 8)").into())
        }
        etf::COMPRESSED => return Err(TermError::Unsupported("compressed term").into()),
        other => return Err(TermError::UnknownTag(other).into()),
    };
    Ok(obj)
}

/// A list of `n` empty slots, filled in place by the decoder (no intermediate Vec). Until
/// every slot is set the list must not reach Python code; on an early error it is dropped,
/// and CPython's list deallocator skips the NULL slots.
fn new_list(py: Python<'_>, n: usize) -> PyResult<Bound<'_, PyList>> {
    // SAFETY: PyList_New returns a new reference (or NULL with an exception set).
    unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyList_New(n as ffi::Py_ssize_t)).map(|l| l.cast_into_unchecked())
    }
}

fn decode_big<'py>(py: Python<'py>, r: &mut Reader<'_>, n: usize) -> Result<Bound<'py, PyAny>> {
    let negative = r.u8()? != 0;
    let digits = r.bytes(n)?;
    if n <= 16 {
        let mut buf = [0u8; 16];
        buf[..n].copy_from_slice(digits);
        let mag = u128::from_le_bytes(buf);
        let obj = if !negative {
            mag.into_pyobject(py)?.into_any()
        } else if mag <= i128::MAX as u128 + 1 {
            (mag as i128).wrapping_neg().into_pyobject(py)?.into_any()
        } else {
            let pos = mag.into_pyobject(py)?;
            pos.neg()?
        };
        return Ok(obj);
    }
    let int_type = py.get_type::<PyInt>();
    let pos = int_type.call_method1("from_bytes", (PyBytes::new(py, digits), "little"))?;
    Ok(if negative { pos.neg()? } else { pos })
}

fn old_float(text: &[u8]) -> Result<f64> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    std::str::from_utf8(&text[..end])
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .ok_or_else(|| TermError::Invalid("FLOAT_EXT is not a number").into())
}

fn decode_atom<'py>(py: Python<'py>, name: &[u8], latin1: bool) -> Result<Bound<'py, PyAny>> {
    Ok(match name {
        b"true" => PyBool::new(py, true).to_owned().into_any(),
        b"false" => PyBool::new(py, false).to_owned().into_any(),
        b"undefined" | b"nil" | b"none" => py.None().into_bound(py),
        _ if latin1 => PyString::new(py, &name.iter().map(|&b| b as char).collect::<String>()).into_any(),
        _ => {
            let s = std::str::from_utf8(name).map_err(|_| TermError::Invalid("atom is not valid UTF-8"))?;
            PyString::new(py, s).into_any()
        }
    })
}

/// Payloads repeat the same short strings (map keys above all) over and over, within one
/// payload and from one call to the next. Reusing one Python string for each saves creating
/// it and, for dict keys, hashing it again (the hash is cached in the string): a 100 KB map of
/// records decoded markedly faster, and a 100-entry map whose keys the previous call already
/// used costs no new string at all. Direct-mapped and small, so a miss costs one hash of at
/// most `MAX_LEN` bytes. The slots outlive the decode: each thread keeps its own (they hold
/// Python objects, used only under the GIL, and strings are immutable, so sharing one between
/// calls is invisible), at most `SLOTS` strings of at most `MAX_LEN` bytes.
struct StrCache<'py> {
    py: Python<'py>,
    slots: Vec<Option<CachedStr>>,
}

/// A cached string and its UTF-8 bytes, kept beside it so that a lookup compares bytes
/// without asking Python for them.
struct CachedStr {
    obj: Py<PyString>,
    len: u8,
    bytes: [u8; StrCache::MAX_LEN],
}

thread_local! {
    /// The calling thread's slots between decodes (see [`StrCache`]).
    static SHORT_STRINGS: std::cell::Cell<Vec<Option<CachedStr>>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<'py> StrCache<'py> {
    const SLOTS: usize = 512;
    const MAX_LEN: usize = 24;

    /// Takes the thread's slots for one decode; they go back when it ends.
    fn new(py: Python<'py>) -> Self {
        StrCache { py, slots: SHORT_STRINGS.with(|c| c.take()) }
    }

    /// A binary as `str` when it is UTF-8, else as `bytes`.
    fn binary(&mut self, bytes: &[u8]) -> Bound<'py, PyAny> {
        let py = self.py;
        if bytes.len() > Self::MAX_LEN {
            return binary_object(py, bytes);
        }
        if self.slots.is_empty() {
            self.slots.resize_with(Self::SLOTS, || None);
        }
        let h = bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193));
        let slot = &mut self.slots[h as usize % Self::SLOTS];
        if let Some(c) = slot {
            if &c.bytes[..c.len as usize] == bytes {
                return c.obj.bind(py).clone().into_any();
            }
        }
        let obj = binary_object(py, bytes);
        if let Ok(s) = obj.cast::<PyString>() {
            let mut c = CachedStr { obj: s.clone().unbind(), len: bytes.len() as u8, bytes: [0; Self::MAX_LEN] };
            c.bytes[..bytes.len()].copy_from_slice(bytes);
            *slot = Some(c);
        }
        obj
    }
}

impl Drop for StrCache<'_> {
    fn drop(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        SHORT_STRINGS.with(|c| c.set(slots));
    }
}

fn binary_object<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyAny> {
    match std::str::from_utf8(bytes) {
        Ok(s) => PyString::new(py, s).into_any(),
        Err(_) => PyBytes::new(py, bytes).into_any(),
    }
}

/// `{'$pyport_bytes', Bin}` and SharedDict handles. Leaves the reader untouched (just after
/// the tuple header) when the tuple is an ordinary one.
fn decode_tagged_tuple<'py>(py: Python<'py>, r: &mut Reader<'_>, arity: usize) -> Result<Option<Bound<'py, PyAny>>> {
    if arity != 2 && arity != 4 {
        return Ok(None);
    }
    let mut probe = *r;
    let tag = probe.u8()?;
    if !etf::is_atom_tag(tag) {
        return Ok(None);
    }
    let name = probe.atom_body(tag)?;
    let parsed = match (arity, name) {
        (2, n) if n == BYTES_TAG.as_bytes() => etf::probe_binary(&mut probe).map(|b| PyBytes::new(py, b).into_any()),
        (4, n) if n == HANDLE_TAG.as_bytes() => probe_handle(&mut probe)
            .map(|handle| Bound::new(py, SharedDictHandle { handle }).map(Bound::into_any))
            .transpose()?,
        _ => None,
    };
    if parsed.is_some() {
        *r = probe;
    }
    Ok(parsed)
}

fn probe_handle(r: &mut Reader<'_>) -> Option<Handle> {
    let generation = etf::probe_uint(r)?;
    let id = etf::probe_uint(r)?;
    let token = etf::probe_binary(r)?.to_vec();
    Some(Handle { generation, id, token })
}

fn short_repr(obj: &Bound<'_, PyAny>) -> String {
    let s = obj.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unrepresentable>".into());
    truncate(s, 200)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------------------
// Python → ETF

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
    let entries_start = out.len();
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
        encode_term(&key, out, depth)?;
        encode_term(&value, out, depth)?;
        if d.len() != len {
            return Err(ConvertError::Unsupported("dict changed size during conversion".into()));
        }
    }
    if count != len {
        return Err(ConvertError::Unsupported("dict changed size during conversion".into()));
    }
    // Distinct str keys always encode to distinct binaries; other keys may collide, with each
    // other or with a str (`'a'` and `b'a'` both become <<"a">>). Only then are the encoded
    // keys compared, found again by walking what was just written, so that the common
    // all-str dict costs no bookkeeping.
    if !all_str {
        check_distinct_keys(&out[entries_start..], len)?;
    }
    Ok(())
}

/// `entries` holds `len` encoded key-value pairs: fails on the first key seen twice.
fn check_distinct_keys(entries: &[u8], len: usize) -> Result<()> {
    let mut r = Reader::new(entries);
    let mut seen = HashSet::with_capacity(len);
    for _ in 0..len {
        let start = r.pos();
        etf::skip_term(&mut r, 0, Limits::PAYLOAD)?;
        let key = &entries[start..r.pos()];
        if !seen.insert(key) {
            return Err(ConvertError::DuplicateKey(describe_key(key)));
        }
        etf::skip_term(&mut r, 0, Limits::PAYLOAD)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::init_for_tests;

    fn round_trip(py: Python<'_>, bytes: &[u8]) -> Vec<u8> {
        let obj = decode(py, bytes).expect("decode");
        encode_versioned(&obj).expect("encode")
    }

    #[test]
    fn scalars_round_trip_through_python() {
        init_for_tests();
        Python::attach(|py| {
            // 1, -5, 2^70, -(2^64), 1.5, <<"héllo">>, <<255>>
            let cases: Vec<Vec<u8>> = vec![
                vec![131, 97, 1],
                vec![131, 98, 255, 255, 255, 251],
                vec![131, 110, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64],
                vec![131, 110, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                vec![131, 70, 63, 248, 0, 0, 0, 0, 0, 0],
                vec![131, 109, 0, 0, 0, 6, b'h', 0xC3, 0xA9, b'l', b'l', b'o'],
                vec![131, 109, 0, 0, 0, 1, 255],
            ];
            for c in cases {
                assert_eq!(round_trip(py, &c), c);
            }
        });
    }

    fn binary_term(b: &[u8]) -> Vec<u8> {
        let mut v = vec![131, 109];
        v.extend((b.len() as u32).to_be_bytes());
        v.extend(b);
        v
    }

    /// A short string is made once per thread and reused by later decodes (the point of the
    /// cache); a different string that lands in the same slot is never taken for it.
    #[test]
    fn short_strings_are_reused_across_decodes_and_never_confused() {
        init_for_tests();
        Python::attach(|py| {
            let a = decode(py, &binary_term(b"user_id")).unwrap();
            let again = decode(py, &binary_term(b"user_id")).unwrap();
            assert!(a.is(&again), "the second decode made a new string");
            // 768 two-byte strings (invalid UTF-8 among them) for 512 slots: many land in a
            // slot that holds another string.
            for x in 0..=255u8 {
                for y in [b'a', b'z', x] {
                    let bytes = [x, y];
                    let obj = decode(py, &binary_term(&bytes)).unwrap();
                    let back = encode_versioned(&obj).unwrap();
                    assert_eq!(back, binary_term(&bytes), "{bytes:?} came back as something else");
                }
            }
        });
    }

    #[test]
    fn bignum_of_many_digits_round_trips() {
        init_for_tests();
        Python::attach(|py| {
            let mut c = vec![131, 110, 40, 1];
            c.extend((1..=40u8).collect::<Vec<_>>());
            let obj = decode(py, &c).unwrap();
            assert!(obj.lt(0).unwrap());
            assert_eq!(encode_versioned(&obj).unwrap(), c);
        });
    }

    #[test]
    fn atoms_map_to_none_bool_and_str() {
        init_for_tests();
        Python::attach(|py| {
            let undefined = [131, 119, 3, b'n', b'i', b'l'];
            assert!(decode(py, &undefined).unwrap().is_none());
            let t = [131, 119, 4, b't', b'r', b'u', b'e'];
            assert!(decode(py, &t).unwrap().is_truthy().unwrap());
            // An ordinary atom becomes str and comes back as a binary.
            let ok = [131, 119, 2, b'o', b'k'];
            assert_eq!(round_trip(py, &ok), vec![131, 109, 0, 0, 0, 2, b'o', b'k']);
            // A Latin-1 ATOM_EXT (OTP 25's default encoding): 'é'
            let latin = [131, 100, 0, 1, 0xE9];
            assert_eq!(decode(py, &latin).unwrap().extract::<String>().unwrap(), "é");
        });
    }

    #[test]
    fn improper_lists_and_bitstrings_are_unsupported() {
        init_for_tests();
        Python::attach(|py| {
            let improper = [131, 108, 0, 0, 0, 1, 97, 1, 97, 2];
            assert!(matches!(decode(py, &improper), Err(ConvertError::Term(TermError::Unsupported(_)))));
            let bits = [131, 77, 0, 0, 0, 1, 3, 0xE0];
            assert!(matches!(decode(py, &bits), Err(ConvertError::Term(TermError::Unsupported(_)))));
        });
    }

    #[test]
    fn colliding_map_keys_are_an_error_both_ways() {
        init_for_tests();
        Python::attach(|py| {
            // #{a => 1, <<"a">> => 2}
            let m = [131, 116, 0, 0, 0, 2, 119, 1, b'a', 97, 1, 109, 0, 0, 0, 1, b'a', 97, 2];
            assert!(matches!(decode(py, &m), Err(ConvertError::DuplicateKey(_))));
            let d = PyDict::new(py);
            d.set_item("a", 1).unwrap();
            d.set_item(PyBytes::new(py, b"a"), 2).unwrap();
            assert!(matches!(encode_versioned(d.as_any()), Err(ConvertError::DuplicateKey(_))));
        });
    }

    /// The duplicate check of a dict with keys other than str walks the encoded pairs: nested
    /// values must not be taken for keys, and a duplicate after them is still found.
    #[test]
    fn mixed_key_dicts_with_nested_values() {
        init_for_tests();
        Python::attach(|py| {
            let d = PyDict::new(py);
            let inner = PyDict::new(py);
            inner.set_item("a", PyList::new(py, [1, 2]).unwrap()).unwrap();
            d.set_item(1, &inner).unwrap();
            d.set_item("a", (PyBytes::new(py, b"a"), "a")).unwrap();
            d.set_item(PyBytes::new(py, b"b"), 2).unwrap();
            let bytes = encode_versioned(d.as_any()).expect("distinct keys encode");
            let back = decode(py, &bytes).unwrap();
            assert_eq!(back.len().unwrap(), 3);
            assert_eq!(encode_versioned(&back).unwrap(), bytes);
            d.set_item(PyBytes::new(py, b"a"), 3).unwrap();
            assert!(matches!(encode_versioned(d.as_any()), Err(ConvertError::DuplicateKey(_))));
        });
    }

    #[test]
    fn nesting_limit_applies_both_ways() {
        init_for_tests();
        Python::attach(|py| {
            let nested = |levels: usize| {
                let mut v = vec![131];
                for _ in 0..levels {
                    v.extend_from_slice(&[108, 0, 0, 0, 1]);
                }
                v.push(106);
                v.extend(std::iter::repeat(106).take(levels));
                v
            };
            let ok = nested(MAX_DEPTH - 1); // plus the innermost [] = MAX_DEPTH lists
            let obj = decode(py, &ok).unwrap();
            assert_eq!(encode_versioned(&obj).unwrap(), ok);
            // One more level than the limit, counting the innermost [] as a list.
            assert!(matches!(decode(py, &nested(MAX_DEPTH)), Err(ConvertError::Term(TermError::TooDeep(_)))));
            let too_deep = nested(MAX_DEPTH + 1);
            assert!(matches!(decode(py, &too_deep), Err(ConvertError::Term(TermError::TooDeep(_)))));
            // A cycle is caught by the same limit instead of overflowing the stack.
            let l = PyList::empty(py);
            l.append(&l).unwrap();
            assert!(matches!(encode_versioned(l.as_any()), Err(ConvertError::Term(TermError::TooDeep(_)))));
        });
    }

    #[test]
    fn small_integer_lists_are_lists_not_strings() {
        init_for_tests();
        Python::attach(|py| {
            let l = PyList::new(py, [-1i64, 2, 255]).unwrap();
            let bytes = encode_versioned(l.as_any()).unwrap();
            assert_eq!(bytes, vec![131, 108, 0, 0, 0, 3, 98, 255, 255, 255, 255, 97, 2, 97, 255, 106]);
            // STRING_EXT from Erlang ("ab") decodes to [97, 98].
            let s = decode(py, &[131, 107, 0, 2, b'a', b'b']).unwrap();
            assert_eq!(s.extract::<Vec<u8>>().unwrap(), vec![97, 98]);
        });
    }

    #[test]
    fn opaque_terms_and_tagged_tuples() {
        init_for_tests();
        Python::attach(|py| {
            // <0.85.0> on nonode@nohost, NEW_PID_EXT
            let mut pid = vec![131, 88, 119, 13];
            pid.extend_from_slice(b"nonode@nohost");
            pid.extend_from_slice(&[0, 0, 0, 85, 0, 0, 0, 0, 0, 0, 0, 1]);
            let obj = decode(py, &pid).unwrap();
            assert!(obj.cast::<OpaqueTerm>().is_ok());
            assert_eq!(encode_versioned(&obj).unwrap(), pid);
            // {'$pyport_bytes', <<"ab">>} -> b"ab"
            let mut t = vec![131, 104, 2, 119, BYTES_TAG.len() as u8];
            t.extend_from_slice(BYTES_TAG.as_bytes());
            t.extend_from_slice(&[109, 0, 0, 0, 2, b'a', b'b']);
            assert!(decode(py, &t).unwrap().cast::<PyBytes>().is_ok());
        });
    }

    #[test]
    fn floats_nan_and_unknown_objects() {
        init_for_tests();
        Python::attach(|py| {
            let nan = PyFloat::new(py, f64::NAN);
            assert_eq!(encode_versioned(nan.as_any()).unwrap(), vec![131, 119, 3, b'n', b'a', b'n']);
            let obj = py.eval(c"object()", None, None).unwrap();
            let bytes = encode_versioned(&obj).unwrap();
            let mut prefix = vec![131, 104, 3, 119, 13];
            prefix.extend_from_slice(b"python_object");
            prefix.extend_from_slice(&[109, 0, 0, 0, 6]);
            prefix.extend_from_slice(b"object");
            prefix.extend_from_slice(&[109]);
            assert!(bytes.starts_with(&prefix), "{bytes:?}");
            assert!(String::from_utf8_lossy(&bytes).contains("<object object at 0x"));
        });
    }

    #[test]
    fn hostile_payloads_are_errors() {
        init_for_tests();
        Python::attach(|py| {
            for bad in [
                &[131u8, 108, 255, 255, 255, 255][..],
                &[131, 68, 0],
                &[131, 82, 0],
                &[131, 109, 0, 0, 0, 5, 1],
                &[131, 118, 0, 2, 0xFF, 0xFE],
                &[131, 116, 0, 0, 0, 1, 106, 106],
                &[],
            ] {
                match decode(py, bad) {
                    Err(ConvertError::Term(_)) | Err(ConvertError::Unsupported(_)) => {}
                    other => panic!("{bad:?} gave {other:?}"),
                }
            }
        });
    }
}

/// Conversion cost on a real payload: `PYPORT_CONVERT_BENCH=file.etf cargo test --release
/// convert_bench -- --ignored --nocapture` (the file holds one `term_to_binary` output).
#[cfg(test)]
mod bench {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "a measurement, run on demand"]
    fn convert_bench() {
        let Ok(path) = std::env::var("PYPORT_CONVERT_BENCH") else { return };
        let bytes = std::fs::read(path).expect("payload file");
        crate::python::init_for_tests();
        Python::attach(|py| {
            // PYPORT_CONVERT_BENCH_N: more rounds, to profile the loop (perf record).
            let n = std::env::var("PYPORT_CONVERT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
            let obj = decode(py, &bytes).expect("decodes");
            let t = Instant::now();
            for _ in 0..n {
                let _ = decode(py, &bytes).expect("decodes");
            }
            let dec = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            let t = Instant::now();
            let mut out = Vec::with_capacity(bytes.len());
            for _ in 0..n {
                out.clear();
                encode(&obj, &mut out).expect("encodes");
            }
            let enc = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!("{} bytes: decode {dec:.1} us, encode {enc:.1} us", bytes.len());
        });
    }
}
