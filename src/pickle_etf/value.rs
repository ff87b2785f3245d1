//! The model of Python values both directions go through, and its ETF form: written as
//! `convert::encode` writes it, read as `convert::decode` builds it.

use super::*;

// ---------------------------------------------------------------------------------------
// The model of Python values

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    OpaqueTerm,
    SharedDictHandle,
}

/// A Python value of the plain subset. Containers carry their nesting depth (an empty one
/// is 1), counted as `convert::encode` counts it.
#[derive(Clone, Debug)]
pub(super) enum V<'a> {
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
    pub(super) fn depth(&self) -> usize {
        match self {
            V::List(_, d) | V::Tuple(_, d) | V::Dict(_, d) | V::Set(_, d) | V::FrozenSet(_, d) => *d,
            _ => 0,
        }
    }
}

/// The depth of a container around an item of depth `inner`, if within the limit.
pub(super) fn around(inner: usize) -> R<usize> {
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
pub(super) fn py_eq_key(v: &V<'_>, out: &mut Vec<u8>, nan: &mut u64) -> R<()> {
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
pub(super) fn check_dict_keys(pairs: &[(V<'_>, V<'_>)]) -> R<()> {
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
pub(super) fn check_hashable(v: &V<'_>) -> R<()> {
    py_eq_key(v, &mut Vec::new(), &mut 0)
}

// ---------------------------------------------------------------------------------------
// Python values → ETF (what convert::encode writes)

pub(super) fn put_etf(v: &V<'_>, out: &mut Vec<u8>) -> R<()> {
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
// ETF → Python values (what convert::decode builds)

pub(super) fn enter(depth: usize) -> R<usize> {
    around(depth)
}

pub(super) fn etf_value<'a>(r: &mut Reader<'a>, depth: usize) -> R<V<'a>> {
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
        tag if kind_of_tag(tag).is_some() => {
            let bytes = etf::term_bytes(r, start, depth, Limits::PAYLOAD)?;
            if opaque_kind(bytes).is_none() {
                return decline("malformed opaque term");
            }
            V::Opaque(Cow::Borrowed(bytes))
        }
        _ => return decline("bitstring, compressed or unknown tag"),
    })
}

pub(super) fn binary(b: &[u8]) -> V<'_> {
    if std::str::from_utf8(b).is_ok() {
        V::Str(Cow::Borrowed(b))
    } else {
        V::Bytes(Cow::Borrowed(b))
    }
}

/// FLOAT_EXT, parsed as `convert` parses it.
pub(super) fn old_float(text: &[u8]) -> R<f64> {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    std::str::from_utf8(&text[..end])
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .ok_or(Declined("FLOAT_EXT is not a number"))
}

/// `{'$pyport_bytes', Bin}` and SharedDict handles (see `protocol::probe_tagged`).
pub(super) fn tagged_tuple<'a>(r: &mut Reader<'a>, arity: usize) -> R<Option<V<'a>>> {
    Ok(protocol::probe_tagged(r, arity)?.map(|tagged| match tagged {
        Tagged::Bytes(b) => V::Bytes(Cow::Borrowed(b)),
        Tagged::Handle { generation, id, token } => V::Handle { generation, id, token: Cow::Borrowed(token) },
    }))
}
