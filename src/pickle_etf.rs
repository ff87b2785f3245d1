//! Pure-Rust translation between SharedDict values (pickle bytes) and Erlang terms (ETF).
//!
//! SharedDict stores every value as `pickle.dumps(v, 5)`. Without this module, every
//! Erlang-side get or set runs `pickle.loads` + `convert::encode` (or `convert::decode` +
//! `pickle.dumps`) and so waits for the GIL, which busy Python threads can hold for long.
//! Here the two formats are translated directly, for plain data, without Python.
//!
//! The rule: EXACT or DECLINE. [`pickle_to_etf`] writes byte for byte what
//! `convert::encode(pickle.loads(p))` writes; [`etf_to_pickle`] writes a pickle that loads
//! as exactly what `convert::decode(etf)` returns (same types, values, dict order). Whenever
//! that is not certain (errors on the Python path, nesting limits, keys that collide,
//! opcodes or types outside the plain subset, richtypes), they return [`Declined`] and the
//! caller takes the Python path, which then produces the right answer or the right error.
//!
//! Both directions go through a small model of Python values ([`V`]). Input is untrusted:
//! every length is checked against the bytes that remain, pickles are run on an explicit
//! stack, and no value nests deeper than `etf::MAX_DEPTH` (deeper input is declined), so
//! the recursive writers are bounded.
//!
//! One deliberate gap: sets and frozensets of two or more elements are declined. Their
//! pickle lists the items in the original set's iteration order, but a set rebuilt from
//! them may iterate differently (that order depends on string hashes, which are randomised
//! per process), and `convert::encode` writes a set in its iteration order.

use crate::etf::{self, Limits, Reader, MAX_DEPTH};
use crate::opaque::{kind_of_tag, term_mac};
use crate::protocol::{BYTES_TAG, HANDLE_TAG};
use crate::richtypes;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// The translation is not certain to match the Python path: use Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declined(pub &'static str);

impl From<etf::TermError> for Declined {
    fn from(_: etf::TermError) -> Self {
        Declined("malformed or unsupported term")
    }
}

type R<T> = Result<T, Declined>;

/// Whether `=:=` of the VM counts 0.0 and -0.0 as equal (OTP releases before 27).
static ZERO_SIGN_IGNORED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells [`terms_exactly_equal`] which OTP release's `=:=` to follow (at start-up).
pub fn set_otp_release(release: u64) {
    ZERO_SIGN_IGNORED.store(release < 27, std::sync::atomic::Ordering::Relaxed);
}

/// Most elements reserved ahead from a count read in the input: a claimed count is only
/// bounded by the input's size, and a huge reservation would fail (aborting the port under
/// `max_memory_bytes`) where growing with the elements that really come does not.
const PREALLOC: usize = 4096;

fn decline<T>(why: &'static str) -> R<T> {
    Err(Declined(why))
}

// ---------------------------------------------------------------------------------------
// Public API

/// `pickle` as CPython's `pickle.dumps(v, 5)` writes it (or as [`etf_to_pickle`] writes it)
/// → appends the ETF body (no version byte) that `convert::encode(pickle.loads(pickle))`
/// appends. On `Err`, `out` is left as it was.
pub fn pickle_to_etf(pickle: &[u8], out: &mut Vec<u8>) -> Result<(), Declined> {
    let value = unpickle(pickle)?;
    let before = out.len();
    put_etf(&value, out).inspect_err(|_| out.truncate(before))
}

/// A versioned ETF term (as `term_to_binary` writes it) → pickle bytes that `pickle.loads`
/// turns into exactly what `convert::decode` returns.
pub fn etf_to_pickle(etf_bytes: &[u8]) -> Result<Vec<u8>, Declined> {
    let mut r = Reader::new(etf_bytes);
    r.expect_version()?;
    let value = etf_value(&mut r, 0)?;
    r.expect_end()?;
    let mut out = Vec::with_capacity(etf_bytes.len() + 16);
    out.extend_from_slice(&[op::PROTO, 5]);
    put_pickle(&value, &mut out)?;
    out.push(op::STOP);
    Ok(out)
}

/// For atomic counters: the value when `pickle` is exactly a plain Python `int` (not a
/// bool, not a subclass), in the forms `pickle.dumps` and [`Int::to_pickle`] write.
pub fn pickle_int(pickle: &[u8]) -> Option<Int> {
    let mut c = Cursor { buf: pickle, pos: 0 };
    loop {
        match c.u8().ok()? {
            op::PROTO => {
                if c.u8().ok()? > 5 {
                    return None;
                }
            }
            op::FRAME => {
                let n = c.u64().ok()?;
                if n > c.remaining() as u64 {
                    return None;
                }
            }
            code => {
                let i = read_int(&mut c, code).ok()??;
                return (c.u8().ok()? == op::STOP && c.remaining() == 0).then_some(i);
            }
        }
    }
}

/// Erlang's `=:=` over two ETF bodies, as written by [`pickle_to_etf`] or by Erlang's
/// `term_to_binary`: maps are equal when they hold the same key/value pairs in any order,
/// a STRING_EXT equals the list of its characters, integers and atoms compare by value
/// whatever their encoding; everything else compares structurally. Malformed input is
/// equal only to identical bytes.
pub fn terms_exactly_equal(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    match (canonical(a), canonical(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Integers of any size

/// A signed integer of any size: an `i64`, or beyond it the minimal two's-complement
/// little-endian bytes (exactly the payload of pickle's LONG1/LONG4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Int(IntRepr);

#[derive(Clone, Debug, PartialEq, Eq)]
enum IntRepr {
    Small(i64),
    /// Never fits in an i64; minimal (no redundant sign byte).
    Big(Vec<u8>),
}

impl Int {
    pub fn from_i64(v: i64) -> Int {
        Int(IntRepr::Small(v))
    }

    /// The integer an ETF integer term holds (SMALL_INTEGER, INTEGER, SMALL_BIG, LARGE_BIG),
    /// with or without the version byte; `None` for anything else or trailing bytes.
    pub fn from_etf(bytes: &[u8]) -> Option<Int> {
        let body = match bytes.first() {
            Some(&etf::VERSION) => &bytes[1..],
            _ => bytes,
        };
        let mut r = Reader::new(body);
        let i = match r.u8().ok()? {
            etf::SMALL_INTEGER => Int::from_i64(r.u8().ok()? as i64),
            etf::INTEGER => Int::from_i64(r.i32().ok()? as i64),
            etf::SMALL_BIG => {
                let n = r.u8().ok()? as usize;
                let negative = r.u8().ok()? != 0;
                Int::from_sign_magnitude(negative, r.bytes(n).ok()?)
            }
            etf::LARGE_BIG => {
                let n = r.u32().ok()? as usize;
                let negative = r.u8().ok()? != 0;
                Int::from_sign_magnitude(negative, r.bytes(n).ok()?)
            }
            _ => return None,
        };
        r.expect_end().ok()?;
        Some(i)
    }

    /// From two's-complement little-endian bytes (any length; empty is 0).
    fn from_twos(bytes: &[u8]) -> Int {
        let mut v = bytes.to_vec();
        trim_twos(&mut v);
        Int::from_trimmed(v)
    }

    fn from_trimmed(v: Vec<u8>) -> Int {
        if v.len() <= 8 {
            let fill = if v.last().is_some_and(|&b| b & 0x80 != 0) { 0xFF } else { 0 };
            let mut buf = [fill; 8];
            buf[..v.len()].copy_from_slice(&v);
            Int(IntRepr::Small(i64::from_le_bytes(buf)))
        } else {
            Int(IntRepr::Big(v))
        }
    }

    fn from_sign_magnitude(negative: bool, magnitude_le: &[u8]) -> Int {
        let mut v = magnitude_le.to_vec();
        v.push(0);
        if negative {
            negate_twos(&mut v);
        }
        trim_twos(&mut v);
        Int::from_trimmed(v)
    }

    /// The minimal two's-complement little-endian bytes (empty for 0).
    fn twos(&self) -> Cow<'_, [u8]> {
        match &self.0 {
            IntRepr::Small(v) => {
                let mut b = v.to_le_bytes().to_vec();
                trim_twos(&mut b);
                Cow::Owned(b)
            }
            IntRepr::Big(b) => Cow::Borrowed(b),
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match self.0 {
            IntRepr::Small(v) => Some(v),
            IntRepr::Big(_) => None,
        }
    }

    fn is_negative(&self) -> bool {
        match &self.0 {
            IntRepr::Small(v) => *v < 0,
            IntRepr::Big(b) => b.last().is_some_and(|&x| x & 0x80 != 0),
        }
    }

    /// The sum; never overflows (the result grows as needed).
    pub fn add(&self, other: &Int) -> Int {
        if let (Some(a), Some(b)) = (self.as_i64(), other.as_i64()) {
            if let Some(s) = a.checked_add(b) {
                return Int::from_i64(s);
            }
        }
        let (a, b) = (self.twos(), other.twos());
        let n = a.len().max(b.len()) + 1;
        let ext = |x: &[u8], i: usize| -> u8 {
            match x.get(i) {
                Some(&v) => v,
                None if x.last().is_some_and(|&l| l & 0x80 != 0) => 0xFF,
                None => 0,
            }
        };
        let mut sum = Vec::with_capacity(n);
        let mut carry = 0u16;
        for i in 0..n {
            let s = ext(&a, i) as u16 + ext(&b, i) as u16 + carry;
            sum.push(s as u8);
            carry = s >> 8;
        }
        trim_twos(&mut sum);
        Int::from_trimmed(sum)
    }

    /// A complete pickle that `pickle.loads` turns into this int (as `pickle.dumps(i, 5)`
    /// would write it, minus the framing).
    pub fn to_pickle(&self) -> Vec<u8> {
        let mut out = vec![op::PROTO, 5];
        self.put_pickle(&mut out);
        out.push(op::STOP);
        out
    }

    /// The opcode CPython's pickler chooses for this value.
    fn put_pickle(&self, out: &mut Vec<u8>) {
        match self.as_i64() {
            Some(v @ 0..=0xFF) => out.extend_from_slice(&[op::BININT1, v as u8]),
            Some(v @ 0x100..=0xFFFF) => {
                out.push(op::BININT2);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            Some(v) if i32::try_from(v).is_ok() => {
                out.push(op::BININT);
                out.extend_from_slice(&(v as i32).to_le_bytes());
            }
            _ => {
                let b = self.twos();
                if b.len() < 256 {
                    out.extend_from_slice(&[op::LONG1, b.len() as u8]);
                } else {
                    out.push(op::LONG4);
                    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                }
                out.extend_from_slice(&b);
            }
        }
    }

    /// Writes the ETF body exactly as `convert::encode` writes a Python int.
    pub fn put_etf(&self, out: &mut Vec<u8>) {
        match &self.0 {
            IntRepr::Small(v) => etf::put_i64(out, *v),
            IntRepr::Big(b) => {
                let negative = self.is_negative();
                let mut m = b.clone();
                if negative {
                    negate_twos(&mut m);
                }
                etf::put_big(out, negative, &m);
            }
        }
    }
}

/// Drops redundant sign bytes (0x00 above a byte < 0x80, 0xFF above a byte >= 0x80); zero
/// becomes empty.
fn trim_twos(v: &mut Vec<u8>) {
    while let [.., prev, last] = v[..] {
        if (last == 0 && prev & 0x80 == 0) || (last == 0xFF && prev & 0x80 != 0) {
            v.pop();
        } else {
            break;
        }
    }
    if v[..] == [0] {
        v.clear();
    }
}

/// Two's-complement negation in place, one sign byte wider so that it cannot overflow.
fn negate_twos(v: &mut Vec<u8>) {
    let fill = if v.last().is_some_and(|&b| b & 0x80 != 0) { 0xFF } else { 0 };
    v.push(fill);
    let mut carry = true;
    for b in v.iter_mut() {
        let (s, c) = (!*b).overflowing_add(carry as u8);
        *b = s;
        carry = c;
    }
}

/// The exact integer an integral finite float equals (Python: `1e20 == 10**20`).
fn int_of_integral_float(f: f64) -> Int {
    if f.abs() < 9.0e18 {
        return Int::from_i64(f as i64);
    }
    let bits = f.to_bits();
    let shift = (((bits >> 52) & 0x7FF) as usize).saturating_sub(1075);
    let mantissa = (bits & ((1 << 52) - 1)) | (1 << 52);
    let mut mag = vec![0u8; shift / 8 + 9];
    let m = (mantissa << (shift % 8)).to_le_bytes();
    mag[shift / 8..shift / 8 + 8].copy_from_slice(&m);
    Int::from_sign_magnitude(f < 0.0, &mag)
}

// ---------------------------------------------------------------------------------------
// The model of Python values

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    OpaqueTerm,
    SharedDictHandle,
}

/// A Python value of the plain subset. Containers carry their nesting depth (an empty one
/// is 1), counted as `convert::encode` counts it.
#[derive(Clone, Debug)]
enum V<'a> {
    None,
    Bool(bool),
    Int(Int),
    Float(f64),
    /// Valid UTF-8.
    Str(Cow<'a, [u8]>),
    Bytes(Cow<'a, [u8]>),
    ByteArray(&'a [u8]),
    List(Vec<V<'a>>, usize),
    Tuple(Vec<V<'a>>, usize),
    Dict(Vec<(V<'a>, V<'a>)>, usize),
    /// At most one element (see the module's note).
    Set(Vec<V<'a>>, usize),
    FrozenSet(Vec<V<'a>>, usize),
    /// `erlang.OpaqueTerm`: the term's ETF (no version byte), already checked.
    Opaque(Cow<'a, [u8]>),
    /// `erlang.SharedDictHandle`.
    Handle { generation: u64, id: u64, token: Cow<'a, [u8]> },
    /// A class pushed by STACK_GLOBAL, waiting for REDUCE.
    Global(Class),
}

impl V<'_> {
    fn depth(&self) -> usize {
        match self {
            V::List(_, d) | V::Tuple(_, d) | V::Dict(_, d) | V::Set(_, d) | V::FrozenSet(_, d) => *d,
            _ => 0,
        }
    }
}

/// The depth of a container around an item of depth `inner`, if within the limit.
fn around(inner: usize) -> R<usize> {
    if inner + 1 > MAX_DEPTH {
        decline("nesting deeper than the limit")
    } else {
        Ok(inner + 1)
    }
}

/// Python's equality on hashable values, as bytes: two keys are equal in a dict exactly when
/// these are. `Err` for unhashable values (list, dict, set, bytearray) and for what this
/// module does not model. NaN equals nothing but itself (the same object), so each NaN
/// gets a fresh token from `nan`.
fn py_eq_key(v: &V<'_>, out: &mut Vec<u8>, nan: &mut u64) -> R<()> {
    let put_len = |out: &mut Vec<u8>, n: usize| out.extend_from_slice(&(n as u64).to_le_bytes());
    match v {
        V::None => out.push(0),
        V::Bool(b) => {
            out.push(1);
            let t = Int::from_i64(*b as i64).twos().into_owned();
            put_len(out, t.len());
            out.extend_from_slice(&t);
        }
        V::Int(i) => {
            out.push(1);
            let t = i.twos();
            put_len(out, t.len());
            out.extend_from_slice(&t);
        }
        V::Float(f) if f.is_nan() => {
            *nan += 1;
            out.push(9);
            out.extend_from_slice(&nan.to_le_bytes());
        }
        V::Float(f) if f.is_finite() && f.fract() == 0.0 => return py_eq_key(&V::Int(int_of_integral_float(*f)), out, nan),
        V::Float(f) => {
            out.push(2);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        V::Str(s) => {
            out.push(3);
            put_len(out, s.len());
            out.extend_from_slice(s);
        }
        V::Bytes(b) => {
            out.push(4);
            put_len(out, b.len());
            out.extend_from_slice(b);
        }
        V::Tuple(items, _) | V::FrozenSet(items, _) => {
            if matches!(v, V::FrozenSet(..)) && items.len() > 1 {
                return decline("frozenset key of several elements");
            }
            out.push(if matches!(v, V::Tuple(..)) { 5 } else { 6 });
            put_len(out, items.len());
            for item in items {
                py_eq_key(item, out, nan)?;
            }
        }
        V::Opaque(b) => {
            out.push(7);
            put_len(out, b.len());
            out.extend_from_slice(b);
        }
        V::Handle { generation, id, token } => {
            out.push(8);
            out.extend_from_slice(&generation.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
            put_len(out, token.len());
            out.extend_from_slice(token);
        }
        V::ByteArray(_) | V::List(..) | V::Dict(..) | V::Set(..) | V::Global(_) => {
            return decline("unhashable or unmodelled key")
        }
    }
    Ok(())
}

/// Declines when building the dict in Python would merge keys or fail on one.
fn check_dict_keys(pairs: &[(V<'_>, V<'_>)]) -> R<()> {
    let mut strs: HashSet<&[u8]> = HashSet::with_capacity(pairs.len());
    let mut others: HashSet<Vec<u8>> = HashSet::new();
    let mut nan = 0u64;
    for (k, _) in pairs {
        let fresh = match k {
            V::Str(s) => strs.insert(s),
            _ => {
                let mut key = Vec::new();
                py_eq_key(k, &mut key, &mut nan)?;
                others.insert(key)
            }
        };
        if !fresh {
            return decline("keys equal in Python");
        }
    }
    Ok(())
}

/// Declines unless `v` is hashable (set elements, dict keys).
fn check_hashable(v: &V<'_>) -> R<()> {
    py_eq_key(v, &mut Vec::new(), &mut 0)
}

// ---------------------------------------------------------------------------------------
// Python values → ETF (what convert::encode writes)

fn put_etf(v: &V<'_>, out: &mut Vec<u8>) -> R<()> {
    match v {
        V::None => etf::put_atom(out, richtypes::none_atom()),
        V::Bool(b) => etf::put_atom(out, if *b { "true" } else { "false" }),
        V::Int(i) => i.put_etf(out),
        V::Float(f) => {
            if f.is_nan() {
                etf::put_atom(out, "nan");
            } else if *f == f64::INFINITY {
                etf::put_atom(out, "infinity");
            } else if *f == f64::NEG_INFINITY {
                etf::put_atom(out, "neg_infinity");
            } else {
                etf::put_f64(out, *f);
            }
        }
        V::Str(b) | V::Bytes(b) => etf::put_binary(out, b),
        V::ByteArray(b) => etf::put_binary(out, b),
        V::List(items, _) | V::Set(items, _) | V::FrozenSet(items, _) => {
            if matches!(v, V::Set(..) | V::FrozenSet(..)) && items.len() > 1 {
                return decline("set of several elements: its order is not known");
            }
            if !items.is_empty() {
                etf::put_list_header(out, items.len());
                for item in items {
                    put_etf(item, out)?;
                }
            }
            etf::put_nil(out);
        }
        V::Tuple(items, _) => {
            etf::put_tuple_header(out, items.len());
            for item in items {
                put_etf(item, out)?;
            }
        }
        V::Dict(pairs, _) => {
            check_dict_keys(pairs)?;
            etf::put_map_header(out, pairs.len());
            let mut spans = Vec::new();
            let all_str = pairs.iter().all(|(k, _)| matches!(k, V::Str(_)));
            for (k, val) in pairs {
                let start = out.len();
                put_etf(k, out)?;
                if !all_str {
                    spans.push((start, out.len()));
                }
                put_etf(val, out)?;
            }
            // Keys distinct in Python may meet once encoded ('a' and b'a'): encode refuses.
            let mut seen = HashSet::with_capacity(spans.len());
            for &(a, b) in &spans {
                if !seen.insert(&out[a..b]) {
                    return decline("keys collide once encoded");
                }
            }
        }
        V::Opaque(b) => out.extend_from_slice(b),
        V::Handle { generation, id, token } => {
            etf::put_tuple_header(out, 4);
            etf::put_atom(out, HANDLE_TAG);
            etf::put_u64(out, *generation);
            etf::put_u64(out, *id);
            etf::put_binary(out, token);
        }
        V::Global(_) => return decline("a class object"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Pickle → Python values (what pickle.loads builds), on an explicit stack

/// Pickle opcodes (Lib/pickle.py).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const REDUCE: u8 = b'R';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: u64) -> R<&'a [u8]> {
        if n > self.remaining() as u64 {
            return decline("truncated pickle");
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn arr<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N as u64)?);
        Ok(a)
    }

    fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.arr()?))
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
}

/// An integer opcode's value; `Ok(None)` when `code` is not one.
fn read_int(c: &mut Cursor<'_>, code: u8) -> R<Option<Int>> {
    Ok(Some(match code {
        op::BININT1 => Int::from_i64(c.u8()? as i64),
        op::BININT2 => Int::from_i64(c.u16()? as i64),
        op::BININT => Int::from_i64(i32::from_le_bytes(c.arr()?) as i64),
        op::LONG1 => {
            let n = c.u8()? as u64;
            Int::from_twos(c.bytes(n)?)
        }
        op::LONG4 => {
            let n = i32::from_le_bytes(c.arr()?);
            if n < 0 {
                return decline("negative LONG4 length");
            }
            Int::from_twos(c.bytes(n as u64)?)
        }
        _ => return Ok(None),
    }))
}

/// What the memo remembers: immutable scalars can be handed out again; anything else
/// (containers, floats whose identity matters for NaN) is declined when fetched.
enum Memo<'a> {
    Value(V<'a>),
    Other,
}

struct Machine<'a> {
    stack: Vec<V<'a>>,
    marks: Vec<usize>,
    memo: HashMap<u64, Memo<'a>>,
}

impl<'a> Machine<'a> {
    /// Items below the innermost mark are out of reach, as in CPython's unpickler.
    fn fence(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> R<V<'a>> {
        if self.stack.len() <= self.fence() {
            return decline("stack underflow");
        }
        self.stack.pop().ok_or(Declined("stack underflow"))
    }

    fn top(&mut self) -> R<&mut V<'a>> {
        if self.stack.len() <= self.fence() {
            return decline("stack underflow");
        }
        self.stack.last_mut().ok_or(Declined("stack underflow"))
    }

    fn pop_mark(&mut self) -> R<Vec<V<'a>>> {
        let m = self.marks.pop().ok_or(Declined("no mark"))?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn memo_put(&mut self, idx: u64) -> R<()> {
        let entry = match self.top()? {
            v @ (V::None
            | V::Bool(_)
            | V::Int(_)
            | V::Str(_)
            | V::Bytes(_)
            | V::Opaque(_)
            | V::Handle { .. }
            | V::Global(_)) => Memo::Value(v.clone()),
            _ => Memo::Other,
        };
        self.memo.insert(idx, entry);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> R<()> {
        match self.memo.get(&idx) {
            Some(Memo::Value(v)) => {
                let v = v.clone();
                self.stack.push(v);
                Ok(())
            }
            Some(Memo::Other) => decline("a shared container (memo reference)"),
            None => decline("memo index not set"),
        }
    }

    fn extend_list(&mut self, items: Vec<V<'a>>) -> R<()> {
        let inner = items.iter().map(V::depth).max().unwrap_or(0);
        match self.top()? {
            V::List(list, d) => {
                *d = (*d).max(around(inner)?);
                list.extend(items);
                Ok(())
            }
            _ => decline("APPEND to something not a list"),
        }
    }

    fn set_items(&mut self, items: Vec<V<'a>>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return decline("odd number of items for SETITEMS");
        }
        let inner = items.iter().map(V::depth).max().unwrap_or(0);
        let V::Dict(pairs, d) = self.top()? else { return decline("SETITEM on something not a dict") };
        *d = (*d).max(around(inner)?);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        Ok(())
    }

    fn add_items(&mut self, items: Vec<V<'a>>) -> R<()> {
        for item in &items {
            check_hashable(item)?;
        }
        let inner = items.iter().map(V::depth).max().unwrap_or(0);
        let V::Set(set, d) = self.top()? else { return decline("ADDITEMS on something not a set") };
        if set.len() + items.len() > 1 {
            return decline("set of several elements: its order is not known");
        }
        *d = (*d).max(around(inner)?);
        set.extend(items);
        Ok(())
    }

    fn push_tuple(&mut self, items: Vec<V<'a>>) -> R<()> {
        let d = around(items.iter().map(V::depth).max().unwrap_or(0))?;
        self.stack.push(V::Tuple(items, d));
        Ok(())
    }

    fn reduce(&mut self) -> R<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let (V::Global(class), V::Tuple(args, _)) = (callable, args) else {
            return decline("REDUCE of something other than a known class");
        };
        let value = match (class, <[V<'a>; 3]>::try_from(args)) {
            (Class::OpaqueTerm, Ok([V::Str(kind), V::Bytes(data), V::Bytes(mac)])) => {
                // As OpaqueTerm's constructor checks: only terms Erlang sent to this port.
                if mac[..] != term_mac(&data)[..] {
                    return decline("OpaqueTerm with a bad MAC");
                }
                if opaque_kind(&data) != Some(std::str::from_utf8(&kind).unwrap_or("")) {
                    return decline("OpaqueTerm that is not the term it claims");
                }
                V::Opaque(data)
            }
            (Class::SharedDictHandle, Ok([V::Int(g), V::Int(i), V::Bytes(token)])) => {
                let as_u64 = |x: &Int| x.as_i64().and_then(|v| u64::try_from(v).ok()).or_else(|| u64_of_big(x));
                match (as_u64(&g), as_u64(&i)) {
                    (Some(generation), Some(id)) => V::Handle { generation, id, token },
                    _ => return decline("SharedDictHandle field out of range"),
                }
            }
            _ => return decline("REDUCE with unexpected arguments"),
        };
        self.stack.push(value);
        Ok(())
    }
}

/// A non-negative int beyond i64 that still fits a u64.
fn u64_of_big(i: &Int) -> Option<u64> {
    let b = i.twos();
    if i.is_negative() || b.len() > 9 || (b.len() == 9 && b[8] != 0) {
        return None;
    }
    let mut buf = [0u8; 8];
    buf[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    Some(u64::from_le_bytes(buf))
}

/// The kind of a well-formed opaque term's bytes, as `OpaqueTerm::new_checked` decides it.
fn opaque_kind(bytes: &[u8]) -> Option<&'static str> {
    let kind = kind_of_tag(*bytes.first()?)?;
    let mut r = Reader::new(bytes);
    etf::skip_term(&mut r, 0, Limits::PAYLOAD).ok()?;
    r.expect_end().ok()?;
    Some(kind)
}

fn unpickle(pickle: &[u8]) -> R<V<'_>> {
    let mut c = Cursor { buf: pickle, pos: 0 };
    let mut m = Machine { stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    loop {
        let code = c.u8()?;
        if let Some(i) = read_int(&mut c, code)? {
            m.stack.push(V::Int(i));
            continue;
        }
        match code {
            op::PROTO => {
                if c.u8()? > 5 {
                    return decline("unsupported pickle protocol");
                }
            }
            op::FRAME => {
                // Frames only group reads; CPython's unpickler just checks the bytes exist.
                if c.u64()? > c.remaining() as u64 {
                    return decline("truncated frame");
                }
            }
            op::STOP => {
                if m.stack.len() != 1 || !m.marks.is_empty() || c.remaining() != 0 {
                    return decline("unusual end of pickle");
                }
                return m.pop();
            }
            op::MARK => m.marks.push(m.stack.len()),
            op::NONE => m.stack.push(V::None),
            op::NEWTRUE => m.stack.push(V::Bool(true)),
            op::NEWFALSE => m.stack.push(V::Bool(false)),
            op::BINFLOAT => m.stack.push(V::Float(f64::from_be_bytes(c.arr()?))),
            op::SHORT_BINUNICODE | op::BINUNICODE | op::BINUNICODE8 => {
                let n = match code {
                    op::SHORT_BINUNICODE => c.u8()? as u64,
                    op::BINUNICODE => c.u32()? as u64,
                    _ => c.u64()?,
                };
                let s = c.bytes(n)?;
                // Strings with lone surrogates (pickled with surrogatepass) cannot be
                // encoded by convert either.
                if std::str::from_utf8(s).is_err() {
                    return decline("str that is not valid UTF-8");
                }
                m.stack.push(V::Str(Cow::Borrowed(s)));
            }
            op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                let n = match code {
                    op::SHORT_BINBYTES => c.u8()? as u64,
                    op::BINBYTES => c.u32()? as u64,
                    _ => c.u64()?,
                };
                let b = c.bytes(n)?;
                m.stack.push(if code == op::BYTEARRAY8 { V::ByteArray(b) } else { V::Bytes(Cow::Borrowed(b)) });
            }
            op::EMPTY_LIST => m.stack.push(V::List(Vec::new(), 1)),
            op::EMPTY_DICT => m.stack.push(V::Dict(Vec::new(), 1)),
            op::EMPTY_SET => m.stack.push(V::Set(Vec::new(), 1)),
            op::EMPTY_TUPLE => m.stack.push(V::Tuple(Vec::new(), 1)),
            op::APPEND => {
                let v = m.pop()?;
                m.extend_list(vec![v])?;
            }
            op::APPENDS => {
                let items = m.pop_mark()?;
                m.extend_list(items)?;
            }
            op::SETITEM => {
                let v = m.pop()?;
                let k = m.pop()?;
                m.set_items(vec![k, v])?;
            }
            op::SETITEMS => {
                let items = m.pop_mark()?;
                m.set_items(items)?;
            }
            op::ADDITEMS => {
                let items = m.pop_mark()?;
                m.add_items(items)?;
            }
            op::FROZENSET => {
                let items = m.pop_mark()?;
                if items.len() > 1 {
                    return decline("frozenset of several elements: its order is not known");
                }
                for item in &items {
                    check_hashable(item)?;
                }
                let d = around(items.iter().map(V::depth).max().unwrap_or(0))?;
                m.stack.push(V::FrozenSet(items, d));
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (code - op::TUPLE1 + 1) as usize;
                let mut items = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    items.push(m.pop()?);
                }
                items.reverse();
                m.push_tuple(items)?;
            }
            op::TUPLE => {
                let items = m.pop_mark()?;
                m.push_tuple(items)?;
            }
            op::STACK_GLOBAL => {
                let name = m.pop()?;
                let module = m.pop()?;
                let class = match (&module, &name) {
                    (V::Str(a), V::Str(b)) if &a[..] == b"erlang" && &b[..] == b"OpaqueTerm" => Class::OpaqueTerm,
                    (V::Str(a), V::Str(b)) if &a[..] == b"erlang" && &b[..] == b"SharedDictHandle" => {
                        Class::SharedDictHandle
                    }
                    _ => return decline("global other than erlang.OpaqueTerm/SharedDictHandle"),
                };
                m.stack.push(V::Global(class));
            }
            op::REDUCE => m.reduce()?,
            op::MEMOIZE => {
                let idx = m.memo.len() as u64;
                m.memo_put(idx)?;
            }
            op::BINPUT => {
                let idx = c.u8()? as u64;
                m.memo_put(idx)?;
            }
            op::LONG_BINPUT => {
                let idx = c.u32()? as u64;
                // CPython sizes its memo table by the index: a huge one may fail there.
                if idx > 1 << 20 {
                    return decline("huge memo index");
                }
                m.memo_put(idx)?;
            }
            op::BINGET => {
                let idx = c.u8()? as u64;
                m.memo_get(idx)?;
            }
            op::LONG_BINGET => {
                let idx = c.u32()? as u64;
                m.memo_get(idx)?;
            }
            _ => return decline("opcode outside the plain subset"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// ETF → Python values (what convert::decode builds)

fn enter(depth: usize) -> R<usize> {
    around(depth)
}

fn etf_value<'a>(r: &mut Reader<'a>, depth: usize) -> R<V<'a>> {
    let start = *r;
    let tag = r.u8()?;
    Ok(match tag {
        etf::SMALL_INTEGER => V::Int(Int::from_i64(r.u8()? as i64)),
        etf::INTEGER => V::Int(Int::from_i64(r.i32()? as i64)),
        etf::SMALL_BIG | etf::LARGE_BIG => {
            let n = if tag == etf::SMALL_BIG { r.u8()? as usize } else { r.u32()? as usize };
            let negative = r.u8()? != 0;
            V::Int(Int::from_sign_magnitude(negative, r.bytes(n)?))
        }
        etf::NEW_FLOAT => V::Float(r.f64()?),
        etf::FLOAT => V::Float(old_float(r.bytes(31)?)?),
        etf::ATOM | etf::ATOM_UTF8 | etf::SMALL_ATOM | etf::SMALL_ATOM_UTF8 => {
            let name = r.atom_body(tag)?;
            match name {
                b"true" => V::Bool(true),
                b"false" => V::Bool(false),
                b"undefined" | b"nil" | b"none" => V::None,
                _ if matches!(tag, etf::ATOM | etf::SMALL_ATOM) => {
                    let s: String = name.iter().map(|&b| b as char).collect();
                    V::Str(Cow::Owned(s.into_bytes()))
                }
                _ => {
                    if std::str::from_utf8(name).is_err() {
                        return decline("atom is not valid UTF-8");
                    }
                    V::Str(Cow::Borrowed(name))
                }
            }
        }
        etf::BINARY => {
            let n = r.u32()? as usize;
            binary(r.bytes(n)?)
        }
        etf::NIL => {
            enter(depth)?;
            V::List(Vec::new(), 1)
        }
        etf::STRING => {
            enter(depth)?;
            let n = r.u16()? as usize;
            V::List(r.bytes(n)?.iter().map(|&b| V::Int(Int::from_i64(b as i64))).collect(), 1)
        }
        etf::LIST => {
            let depth = enter(depth)?;
            let raw = r.u32()?;
            let n = r.count(raw, 1)?;
            let mut items = Vec::with_capacity(n.min(PREALLOC));
            for _ in 0..n {
                items.push(etf_value(r, depth)?);
            }
            if r.u8()? != etf::NIL {
                return decline("improper list");
            }
            V::List(items, 0)
        }
        etf::SMALL_TUPLE | etf::LARGE_TUPLE => {
            let depth = enter(depth)?;
            let raw = if tag == etf::SMALL_TUPLE { r.u8()? as u32 } else { r.u32()? };
            let n = r.count(raw, 1)?;
            if let Some(special) = tagged_tuple(r, n)? {
                special
            } else {
                let mut items = Vec::with_capacity(n.min(PREALLOC));
                for _ in 0..n {
                    items.push(etf_value(r, depth)?);
                }
                // richtypes::from_tagged turns these into dates, decimals, ... (or errors);
                // its Python helper leaves every other tuple alone.
                if let Some(V::Str(tag)) = items.first() {
                    if matches!(
                        (&tag[..], n),
                        (b"$pyport_date" | b"$pyport_decimal" | b"$pyport_uuid", 2)
                            | (b"$pyport_time" | b"$pyport_datetime" | b"$pyport_timedelta", 4)
                    ) {
                        return decline("tagged richtypes tuple");
                    }
                }
                V::Tuple(items, 0)
            }
        }
        etf::MAP => {
            let depth = enter(depth)?;
            let raw = r.u32()?;
            let n = r.count(raw, 2)?;
            let mut pairs = Vec::with_capacity(n.min(PREALLOC));
            for _ in 0..n {
                let k = etf_value(r, depth)?;
                let v = etf_value(r, depth)?;
                pairs.push((k, v));
            }
            check_dict_keys(&pairs)?;
            // richtypes::from_struct turns Elixir structs into Python objects.
            if pairs.iter().any(|(k, _)| matches!(k, V::Str(s) if &s[..] == b"__struct__")) {
                return decline("Elixir struct");
            }
            V::Dict(pairs, 0)
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
            etf::skip_term(r, depth, Limits { max_depth: MAX_DEPTH, max_count: usize::MAX })?;
            let bytes = r.slice(from, r.pos());
            if opaque_kind(bytes).is_none() {
                return decline("malformed opaque term");
            }
            V::Opaque(Cow::Borrowed(bytes))
        }
        _ => return decline("bitstring, compressed or unknown tag"),
    })
}

fn binary(b: &[u8]) -> V<'_> {
    if std::str::from_utf8(b).is_ok() {
        V::Str(Cow::Borrowed(b))
    } else {
        V::Bytes(Cow::Borrowed(b))
    }
}

/// FLOAT_EXT, parsed as `convert` parses it.
fn old_float(text: &[u8]) -> R<f64> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    std::str::from_utf8(&text[..end])
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .ok_or(Declined("FLOAT_EXT is not a number"))
}

/// `{'$pyport_bytes', Bin}` and SharedDict handles, as `convert::decode_tagged_tuple` reads
/// them; leaves the reader untouched for an ordinary tuple.
fn tagged_tuple<'a>(r: &mut Reader<'a>, arity: usize) -> R<Option<V<'a>>> {
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
        (2, n) if n == BYTES_TAG.as_bytes() => etf::probe_binary(&mut probe).map(|b| V::Bytes(Cow::Borrowed(b))),
        (4, n) if n == HANDLE_TAG.as_bytes() => (|| {
            let generation = etf::probe_uint(&mut probe)?;
            let id = etf::probe_uint(&mut probe)?;
            let token = Cow::Borrowed(etf::probe_binary(&mut probe)?);
            Some(V::Handle { generation, id, token })
        })(),
        _ => None,
    };
    if parsed.is_some() {
        *r = probe;
    }
    Ok(parsed)
}

// ---------------------------------------------------------------------------------------
// Python values → pickle (a plain protocol-5 form: no frames, no memo)

fn put_pickle(v: &V<'_>, out: &mut Vec<u8>) -> R<()> {
    match v {
        V::None => out.push(op::NONE),
        V::Bool(b) => out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
        V::Int(i) => i.put_pickle(out),
        V::Float(f) => {
            out.push(op::BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        V::Str(s) => put_sized(out, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8, s),
        V::Bytes(b) => put_sized(out, op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8, b),
        V::List(items, _) => {
            out.push(op::EMPTY_LIST);
            if !items.is_empty() {
                out.push(op::MARK);
                for item in items {
                    put_pickle(item, out)?;
                }
                out.push(op::APPENDS);
            }
        }
        V::Tuple(items, _) => {
            if items.is_empty() {
                out.push(op::EMPTY_TUPLE);
            } else {
                if items.len() > 3 {
                    out.push(op::MARK);
                }
                for item in items {
                    put_pickle(item, out)?;
                }
                out.push(match items.len() {
                    1 => op::TUPLE1,
                    2 => op::TUPLE2,
                    3 => op::TUPLE3,
                    _ => op::TUPLE,
                });
            }
        }
        V::Dict(pairs, _) => {
            out.push(op::EMPTY_DICT);
            if !pairs.is_empty() {
                out.push(op::MARK);
                for (k, val) in pairs {
                    put_pickle(k, out)?;
                    put_pickle(val, out)?;
                }
                out.push(op::SETITEMS);
            }
        }
        V::Opaque(data) => {
            let kind = opaque_kind(data).ok_or(Declined("malformed opaque term"))?;
            put_global(out, "OpaqueTerm");
            put_sized(out, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8, kind.as_bytes());
            put_sized(out, op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8, data);
            put_sized(out, op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8, &term_mac(data));
            out.extend_from_slice(&[op::TUPLE3, op::REDUCE]);
        }
        V::Handle { generation, id, token } => {
            put_global(out, "SharedDictHandle");
            for n in [generation, id] {
                match i64::try_from(*n) {
                    Ok(v) => Int::from_i64(v).put_pickle(out),
                    Err(_) => Int::from_sign_magnitude(false, &n.to_le_bytes()).put_pickle(out),
                }
            }
            put_sized(out, op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8, token);
            out.extend_from_slice(&[op::TUPLE3, op::REDUCE]);
        }
        V::ByteArray(_) | V::Set(..) | V::FrozenSet(..) | V::Global(_) => {
            return decline("not a value convert::decode builds")
        }
    }
    Ok(())
}

fn put_sized(out: &mut Vec<u8>, short: u8, long: u8, long8: u8, data: &[u8]) {
    if data.len() < 256 {
        out.extend_from_slice(&[short, data.len() as u8]);
    } else if let Ok(n) = u32::try_from(data.len()) {
        out.push(long);
        out.extend_from_slice(&n.to_le_bytes());
    } else {
        out.push(long8);
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(data);
}

fn put_global(out: &mut Vec<u8>, name: &str) {
    put_sized(out, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8, b"erlang");
    put_sized(out, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8, name.as_bytes());
    out.push(op::STACK_GLOBAL);
}

// ---------------------------------------------------------------------------------------
// Canonical form for terms_exactly_equal

/// The term with every map's pairs sorted by their (canonical) key bytes.
fn canonical(body: &[u8]) -> R<Vec<u8>> {
    let mut r = Reader::new(body);
    let mut out = Vec::with_capacity(body.len());
    canonical_term(&mut r, &mut out, 0)?;
    r.expect_end()?;
    Ok(out)
}

/// `depth` counts the containers around the term, as `etf::skip_term` counts them.
fn canonical_term(r: &mut Reader<'_>, out: &mut Vec<u8>, outer: usize) -> R<()> {
    let start = *r;
    let tag = r.u8()?;
    let depth = if matches!(tag, etf::LIST | etf::SMALL_TUPLE | etf::LARGE_TUPLE | etf::MAP) { enter(outer)? } else { outer };
    match tag {
        etf::LIST => {
            let raw = r.u32()?;
            let n = r.count(raw, 1)?;
            etf::put_list_header(out, n);
            for _ in 0..=n {
                canonical_term(r, out, depth)?;
            }
        }
        tag @ (etf::SMALL_TUPLE | etf::LARGE_TUPLE) => {
            let raw = if tag == etf::SMALL_TUPLE { r.u8()? as u32 } else { r.u32()? };
            let n = r.count(raw, 1)?;
            etf::put_tuple_header(out, n);
            for _ in 0..n {
                canonical_term(r, out, depth)?;
            }
        }
        etf::MAP => {
            let raw = r.u32()?;
            let n = r.count(raw, 2)?;
            let mut pairs = Vec::with_capacity(n.min(PREALLOC));
            for _ in 0..n {
                let (mut k, mut v) = (Vec::new(), Vec::new());
                canonical_term(r, &mut k, depth)?;
                canonical_term(r, &mut v, depth)?;
                pairs.push((k, v));
            }
            pairs.sort();
            etf::put_map_header(out, n);
            for (k, v) in pairs {
                out.extend_from_slice(&k);
                out.extend_from_slice(&v);
            }
        }
        // Before OTP 27, 0.0 =:= -0.0: the sign of a zero does not count there.
        etf::NEW_FLOAT => {
            let v = r.f64()?;
            let v = if v == 0.0 && ZERO_SIGN_IGNORED.load(std::sync::atomic::Ordering::Relaxed) { 0.0 } else { v };
            etf::put_f64(out, v);
        }
        // Erlang writes a list of small integers as STRING_EXT: the same term as a LIST.
        etf::STRING => {
            let n = r.u16()? as usize;
            let chars = r.bytes(n)?;
            etf::put_list_header(out, n);
            for &c in chars {
                etf::put_i64(out, c as i64);
            }
            etf::put_nil(out);
        }
        etf::SMALL_INTEGER | etf::INTEGER | etf::SMALL_BIG | etf::LARGE_BIG => {
            *r = start;
            let from = r.pos();
            etf::skip_term(r, outer, Limits::PAYLOAD)?;
            match Int::from_etf(r.slice(from, r.pos())) {
                Some(i) => i.put_etf(out),
                None => return decline("malformed integer"),
            }
        }
        // Latin-1 and UTF-8 atom encodings name the same atoms.
        etf::ATOM | etf::SMALL_ATOM | etf::ATOM_UTF8 | etf::SMALL_ATOM_UTF8 => {
            let name = r.atom_body(tag)?;
            let text = if matches!(tag, etf::ATOM | etf::SMALL_ATOM) {
                name.iter().map(|&b| b as char).collect::<String>()
            } else {
                std::str::from_utf8(name).map_err(|_| Declined("atom is not valid UTF-8"))?.to_owned()
            };
            etf::put_atom(out, &text);
        }
        _ => {
            *r = start;
            let from = r.pos();
            etf::skip_term(r, outer, Limits::PAYLOAD)?;
            out.extend_from_slice(r.slice(from, r.pos()));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "pickle_etf_tests.rs"]
mod tests;
