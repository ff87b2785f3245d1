//! ETF to Python objects.

use super::{enter, short_repr, ConvertError, Result};
use crate::etf::{self, Limits, Reader, TermError, MAX_DEPTH};
use crate::opaque::kind_of_tag;
use crate::protocol::{self, Handle, Tagged};
use crate::pymodule::{OpaqueTerm, SharedDictHandle};
use crate::richtypes;
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

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
                // SAFETY: `list` is a fresh list of length n and slot i is empty; SetItem
                // steals the reference that into_ptr hands over (and cannot fail in range).
                unsafe { ffi::PyList_SetItem(list.as_ptr(), i as ffi::Py_ssize_t, item.into_ptr()) };
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
        tag if kind_of_tag(tag).is_some() => {
            let bytes = etf::term_bytes(r, start, depth, Limits { max_depth: limit, max_count: usize::MAX })?;
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
/// used needs new strings only for the keys that share a slot (8 of the bench's 100).
/// Direct-mapped and small, so a miss costs one hash of at most `MAX_LEN` bytes. The slots
/// outlive the decode: each thread keeps its own (they hold Python objects, used only under
/// the GIL, and strings are immutable, so sharing one between calls is invisible), at most
/// `SLOTS` strings of at most `MAX_LEN` bytes.
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

/// `{'$pyport_bytes', Bin}` and SharedDict handles (see `protocol::probe_tagged`).
fn decode_tagged_tuple<'py>(py: Python<'py>, r: &mut Reader<'_>, arity: usize) -> Result<Option<Bound<'py, PyAny>>> {
    Ok(match protocol::probe_tagged(r, arity)? {
        Some(Tagged::Bytes(b)) => Some(PyBytes::new(py, b).into_any()),
        Some(Tagged::Handle { generation, id, token }) => {
            let handle = Handle { generation, id, token: token.to_vec() };
            Some(Bound::new(py, SharedDictHandle { handle })?.into_any())
        }
        None => None,
    })
}
