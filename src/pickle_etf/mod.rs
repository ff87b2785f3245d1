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

mod int;
mod pickle;
mod value;
#[cfg(test)]
mod tests;

pub use int::Int;
use int::*;
use pickle::*;
use value::*;

use crate::etf::{self, Limits, Reader, MAX_DEPTH};
use crate::opaque::{kind_of_tag, term_mac};
use crate::protocol::{self, Tagged, HANDLE_TAG};
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
    let mut c = Cursor::new(pickle);
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
