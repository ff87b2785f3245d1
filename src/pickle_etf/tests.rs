//! Tests of `pickle_etf` against the Python path it replaces (an embedded CPython).
//!
//! The differential fuzz checks the module's one promise, EXACT or DECLINE, on three kinds of
//! input, for `PICKLE_FUZZ_SECONDS` (default 12) from a fixed seed:
//! (a) random ETF terms (the generator of `src/tests/fuzz.rs`, valid and hostile): `etf_to_pickle`
//!     declines whenever `convert::decode` fails, and otherwise `pickle.loads` of its output is
//!     identical (types, float bits, dict order) to what `convert::decode` built; the decoded
//!     value, pickled by CPython and by `etf_to_pickle`, must translate back to what
//!     `convert::encode` writes;
//! (b) random Python values (a seeded generator in Python: bytes, sets, NaN, -0.0, infinities,
//!     big ints, shared references, repeated strings, cycles, subclasses, nesting past 1000):
//!     `pickle_to_etf(pickle.dumps(v, 5))` declines whenever `convert::encode(v)` fails and
//!     otherwise writes exactly its bytes;
//! (c) plain data (no subclasses, cycles, shared containers, colliding keys, nesting past
//!     1000, sets of several elements) is never declined; and mutated (truncated, bit-flipped)
//!     pickles never panic, and when they are translated, Python loads them to the same term.

use super::*;
use crate::convert;
use crate::python::init_for_tests;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Small helpers: a strict comparator, a plain-data test and a value generator. Iterative
/// where values can nest past Python's recursion limit.
const HELPERS: &std::ffi::CStr = cr#"
import collections, enum, pickle, random, struct

def same(a, b):
    """Identical types throughout, floats bit for bit (NaN, -0.0), dicts in item order."""
    todo = [(a, b)]
    while todo:
        a, b = todo.pop()
        t = type(a)
        if t is not type(b):
            return False
        if t is float:
            if struct.pack('<d', a) != struct.pack('<d', b):
                return False
        elif t in (list, tuple, set, frozenset, dict):
            if len(a) != len(b):
                return False
            if t is dict:
                todo.extend(zip(a.keys(), b.keys()))
                todo.extend(zip(a.values(), b.values()))
            else:
                todo.extend(zip(a, b))
        elif a != b:
            return False
    return True

SCALARS = (type(None), bool, int, float, str, bytes)

def plain(v):
    """The data the Rust path must never decline (see pickle_etf's module note on sets)."""
    import erlang
    seen = set()
    todo = [(v, 0)]
    while todo:
        x, d = todo.pop()
        t = type(x)
        if t in SCALARS or t in (erlang.OpaqueTerm, erlang.SharedDictHandle):
            continue
        if t not in (list, tuple, dict, set, frozenset, bytearray) or id(x) in seen:
            return False
        if x != () :
            seen.add(id(x))
        if t is bytearray:
            continue
        if d + 1 > 1000 or (t in (set, frozenset) and len(x) > 1):
            return False
        items = [i for kv in x.items() for i in kv] if t is dict else list(x)
        todo.extend((i, d + 1) for i in items)
    return True

class S(str): pass
class E(enum.IntEnum):
    A = 1
P = collections.namedtuple('P', 'x y')

def gen(seed):
    r = random.Random(seed)
    shared = [1, 'x']
    def big():
        return r.choice([1, -1]) * 2 ** r.randrange(60, 200) + r.randrange(-3, 4)
    def leaf():
        return r.choice([
            lambda: None, lambda: r.random() < 0.5, lambda: r.randrange(-70000, 70000),
            lambda: r.randrange(-2**70, 2**70), big, lambda: r.uniform(-1e9, 1e9),
            lambda: r.choice([float('nan'), -0.0, 0.0, float('inf'), float('-inf'), 1e300, 2.0 ** 70]),
            lambda: r.choice(['', 'a', 'h\xe9llo', 'rep', '\U0001F600' * 3, 'x' * 300]),
            lambda: bytes(r.randrange(256) for _ in range(r.randrange(6))), lambda: b'y' * 300,
            lambda: bytearray(b'ab'), lambda: r.choice([S('s'), E.A, P(1, 2), '\ud800']),
        ])()
    def key():
        return r.choice([
            lambda: r.randrange(-3, 3), lambda: r.choice('abc'), lambda: r.choice([b'a', b'b']),
            lambda: (1, 'a'), lambda: 1.5, lambda: 2.0, lambda: True, lambda: None, big,
            lambda: frozenset([r.randrange(3)]), lambda: float('nan'),
        ])()
    def node(d):
        if d <= 0 or r.random() < 0.3:
            return leaf()
        n = r.randrange(5)
        k = r.randrange(12)
        if k < 3: return [node(d - 1) for _ in range(n)]
        if k < 5: return tuple(node(d - 1) for _ in range(r.randrange(6)))
        if k < 8: return {key(): node(d - 1) for _ in range(n)}
        if k == 8: return r.choice([set, frozenset])(key() for _ in range(r.randrange(3)))
        if k == 9: return r.choice([[shared, shared], ['rep', 'rep'], [(1, 2)] * 2])
        if k == 10:
            c = [1]
            c.append(c)
            return c
        v = leaf()
        for _ in range(r.choice([5, 998, 999, 1000, 1001, 1500])):
            v = r.choice([[v], (v,), {'k': v}])
        return v
    return node(4)
"#;

struct Py3<'py> {
    same: Bound<'py, PyAny>,
    plain: Bound<'py, PyAny>,
    generate: Bound<'py, PyAny>,
    dumps: Bound<'py, PyAny>,
    loads: Bound<'py, PyAny>,
}

fn helpers(py: Python<'_>) -> Py3<'_> {
    let _ = crate::python::raise_recursion_limit();
    let g = PyDict::new(py);
    py.run(HELPERS, Some(&g), None).expect("test helpers");
    let get = |n: &str| g.get_item(n).unwrap().unwrap();
    let pickle = py.import("pickle").unwrap();
    Py3 {
        same: get("same"),
        plain: get("plain"),
        generate: get("gen"),
        dumps: pickle.getattr("dumps").unwrap(),
        loads: pickle.getattr("loads").unwrap(),
    }
}

fn encode(obj: &Bound<'_, PyAny>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    convert::encode(obj, &mut out).ok().map(|()| out)
}

fn dumps(h: &Py3<'_>, obj: &Bound<'_, PyAny>) -> Option<Vec<u8>> {
    let b = h.dumps.call1((obj, 5)).ok()?;
    Some(b.cast::<PyBytes>().ok()?.as_bytes().to_vec())
}

fn loads<'py>(h: &Py3<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    h.loads.call1((PyBytes::new(h.loads.py(), bytes),))
}

#[derive(Default, Debug)]
struct Counts {
    etf_terms: u64,
    etf_decoded: u64,
    etf_translated: u64,
    /// Terms that decode to plain data, and how many of them were declined, by reason.
    etf_plain: u64,
    etf_plain_declined: BTreeMap<&'static str, u64>,
    values: u64,
    values_encoded: u64,
    values_translated: u64,
    values_plain: u64,
    declined: BTreeMap<&'static str, u64>,
    mutated: u64,
    mutated_translated: u64,
}

/// Checks one Python value: the Rust translation of its pickle is exact or declined, and
/// plain data is never declined. `pickle` defaults to CPython's own.
fn check_value(h: &Py3<'_>, obj: &Bound<'_, PyAny>, pickle: Option<Vec<u8>>, n: &mut Counts) -> Result<(), String> {
    let Some(pickle) = pickle.or_else(|| dumps(h, obj)) else { return Ok(()) };
    n.values += 1;
    let expected = encode(obj);
    n.values_encoded += expected.is_some() as u64;
    let mut got = vec![0xAA];
    let r = pickle_to_etf(&pickle, &mut got);
    let plain = expected.is_some() && h.plain.call1((obj,)).and_then(|p| p.is_truthy()).unwrap_or(false);
    n.values_plain += plain as u64;
    match (r, expected) {
        (Ok(()), Some(e)) if got[1..] == e[..] => n.values_translated += 1,
        (Ok(()), e) => return Err(format!("pickle_to_etf gave {:?}, encode {e:?}", &got[1..])),
        (Err(Declined(why)), _) if plain => return Err(format!("plain data declined: {why}")),
        (Err(Declined(why)), _) => {
            *n.declined.entry(why).or_default() += 1;
            if got != [0xAA] {
                return Err("a declined translation left bytes behind".into());
            }
        }
    }
    Ok(())
}

/// Checks one ETF term (direction a), then the value it decodes to (direction b).
fn check_term(h: &Py3<'_>, term: &[u8], n: &mut Counts) -> Result<(), String> {
    let py = h.same.py();
    n.etf_terms += 1;
    let decoded = convert::decode(py, term);
    let translated = etf_to_pickle(term);
    let obj = match (decoded, translated) {
        (Err(_), Ok(_)) => return Err("etf_to_pickle accepted a term convert::decode refuses".into()),
        (Err(_), Err(_)) => return Ok(()),
        (Ok(obj), Err(Declined(why))) => {
            n.etf_decoded += 1;
            if h.plain.call1((&obj,)).and_then(|p| p.is_truthy()).unwrap_or(false) {
                n.etf_plain += 1;
                *n.etf_plain_declined.entry(why).or_default() += 1;
            }
            check_value(h, &obj, None, n)?;
            return Ok(());
        }
        (Ok(obj), Ok(p)) => {
            n.etf_decoded += 1;
            n.etf_translated += 1;
            n.etf_plain += 1;
            let loaded = loads(h, &p).map_err(|e| format!("pickle.loads refused etf_to_pickle's output: {e}"))?;
            if !h.same.call1((&loaded, &obj)).and_then(|s| s.is_truthy()).unwrap_or(false) {
                return Err("pickle.loads(etf_to_pickle(t)) differs from convert::decode(t)".into());
            }
            // Our own pickles translate back (as the Erlang-side get would read them).
            check_value(h, &obj, Some(p), n)?;
            obj
        }
    };
    check_value(h, &obj, None, n)
}

/// Mutates CPython's pickle of a value: whatever the Rust path accepts must be what
/// `pickle.loads` + `convert::encode` produce; nothing may panic.
fn check_mutated(h: &Py3<'_>, pickle: &[u8], rng: &mut u64, n: &mut Counts) -> Result<(), String> {
    // xorshift64: enough randomness for picking spots, and no dependency on rand's traits.
    let mut pick = |below: usize| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        (*rng % below.max(1) as u64) as usize
    };
    let mut m = pickle.to_vec();
    let at = pick(m.len());
    match pick(3) {
        0 => m.truncate(pick(m.len() + 1)),
        1 if !m.is_empty() => m[at] ^= 1 << pick(8),
        _ if !m.is_empty() => m[at] = pick(256) as u8,
        _ => {}
    }
    n.mutated += 1;
    let _ = pickle_int(&m);
    let mut got = Vec::new();
    if pickle_to_etf(&m, &mut got).is_ok() {
        n.mutated_translated += 1;
        // Only loaded when the Rust path accepted it: then it names no class but ours.
        let obj = loads(h, &m).map_err(|e| format!("accepted a pickle Python refuses: {e}"))?;
        if encode(&obj).as_deref() != Some(&got[..]) {
            return Err("a mutated pickle translated differently from Python".into());
        }
    }
    Ok(())
}

#[test]
fn differential_fuzz() {
    init_for_tests();
    let seconds: u64 = std::env::var("PICKLE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let seed = *b"pyport pickle_etf differential!!";
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let terms = proptest::prop_oneof![crate::tests::fuzz::valid_term(), crate::tests::fuzz::any_term()];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut n = Counts::default();
    let mut py_seed = 0u64;
    Python::attach(|py| {
        let h = helpers(py);
        while Instant::now() < deadline {
            let term = terms.new_tree(&mut runner).expect("strategy").current();
            let bytes = term.versioned();
            if let Err(e) = check_term(&h, &bytes, &mut n) {
                panic!("{e}\nterm: {bytes:?}");
            }
            for _ in 0..2 {
                py_seed += 1;
                let obj = h.generate.call1((py_seed,)).expect("gen");
                if let Err(e) = check_value(&h, &obj, None, &mut n) {
                    panic!("{e}\nvalue: gen({py_seed})");
                }
                if let Some(p) = dumps(&h, &obj) {
                    if let Err(e) = check_mutated(&h, &p, &mut rng, &mut n) {
                        panic!("{e}\nvalue: gen({py_seed})");
                    }
                }
            }
        }
    });
    let plain_declined: u64 = n.etf_plain_declined.values().sum();
    println!(
        "pickle_etf fuzz, {seconds} s: {} ETF terms ({} decode, {} translated; {} plain, {} of them declined: {:?}); \
         {} Python values ({} encode, {} plain, {} translated exactly; declined: {:?}); \
         {} mutated pickles ({} translated, all as Python does)",
        n.etf_terms,
        n.etf_decoded,
        n.etf_translated,
        n.etf_plain,
        plain_declined,
        n.etf_plain_declined,
        n.values,
        n.values_encoded,
        n.values_plain,
        n.values_translated,
        n.declined,
        n.mutated,
        n.mutated_translated
    );
    assert_eq!(plain_declined, 0, "ETF terms that decode to plain data were declined: {:?}", n.etf_plain_declined);
    assert!(n.values_plain > 1000 && n.etf_translated > 1000, "too few cases: {n:?}");
}

// ---------------------------------------------------------------------------------------
// Int against Python's own arithmetic

fn py_int<'py>(py: Python<'py>, i: &Int) -> Bound<'py, PyAny> {
    let mut etf = vec![etf::VERSION];
    i.put_etf(&mut etf);
    convert::decode(py, &etf).expect("an int decodes")
}

#[test]
fn int_arithmetic_matches_python() {
    init_for_tests();
    Python::attach(|py| {
        let h = helpers(py);
        let edges: Vec<Int> = {
            let mut v: Vec<Int> = [0i64, 1, -1, 127, 128, 255, 256, -128, -129, 65535, 65536, i32::MAX as i64,
                i32::MIN as i64, i32::MAX as i64 + 1, i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1]
                .iter()
                .map(|&x| Int::from_i64(x))
                .collect();
            // 2^64, -2^63-1, 2^64-1, -2^64, 2^200, -(2^200)
            for etf_bytes in [
                &[etf::SMALL_BIG, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1][..],
                &[etf::SMALL_BIG, 8, 1, 1, 0, 0, 0, 0, 0, 0, 0x80],
                &[etf::SMALL_BIG, 8, 0, 255, 255, 255, 255, 255, 255, 255, 255],
                &[etf::SMALL_BIG, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            ] {
                v.push(Int::from_etf(etf_bytes).expect("an ETF integer"));
            }
            let mut big = vec![etf::SMALL_BIG, 26, 0];
            big.extend_from_slice(&[0; 25]);
            big.push(1);
            v.push(Int::from_etf(&big).unwrap());
            big[2] = 1;
            v.push(Int::from_etf(&big).unwrap());
            v
        };
        for a in &edges {
            // Each form agrees with Python: ETF both ways, pickle both ways.
            let pa = py_int(py, a);
            assert_eq!(encode(&pa).unwrap(), {
                let mut o = Vec::new();
                a.put_etf(&mut o);
                o
            });
            let from_pickle = pickle_int(&dumps(&h, &pa).unwrap());
            assert_eq!(from_pickle.as_ref(), Some(a), "pickle_int of CPython's pickle of {pa}");
            let ours = loads(&h, &a.to_pickle()).unwrap();
            assert!(ours.eq(&pa).unwrap() && ours.get_type().is(py.get_type::<pyo3::types::PyInt>()));
            for b in &edges {
                let sum = a.add(b);
                let expected = pa.add(py_int(py, b)).unwrap();
                assert!(py_int(py, &sum).eq(&expected).unwrap(), "{pa} + {}", py_int(py, b));
                assert_eq!(sum, Int::from_etf(&encode(&expected).unwrap()).unwrap(), "normalised form");
            }
        }
        // Not plain ints: bool, int subclass, float, trailing bytes.
        for src in [c"True", c"__import__('http').HTTPStatus.OK", c"1.0"] {
            let obj = py.eval(src, None, None).unwrap();
            assert_eq!(pickle_int(&dumps(&h, &obj).unwrap()), None, "{src:?}");
        }
        let mut trailing = Int::from_i64(5).to_pickle();
        trailing.push(0);
        assert_eq!(pickle_int(&trailing), None);
        assert_eq!(Int::from_etf(&[131, etf::SMALL_INTEGER, 7]), Some(Int::from_i64(7)));
        assert_eq!(Int::from_etf(&[etf::SMALL_INTEGER, 7, 0]), None);
        assert_eq!(Int::from_etf(&[etf::NEW_FLOAT, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    });
}

#[test]
fn exact_equality_ignores_map_order_only() {
    let mut a = Vec::new();
    let mut b = Vec::new();
    // #{a => 1, b => #{x => [1.0], y => {}}} written in two orders.
    let inner = |out: &mut Vec<u8>, flip: bool| {
        etf::put_map_header(out, 2);
        let (x, y) = (|o: &mut Vec<u8>| {
            etf::put_binary(o, b"x");
            etf::put_list_header(o, 1);
            etf::put_f64(o, 1.0);
            etf::put_nil(o);
        }, |o: &mut Vec<u8>| {
            etf::put_binary(o, b"y");
            etf::put_tuple_header(o, 0);
        });
        if flip {
            y(out);
            x(out);
        } else {
            x(out);
            y(out);
        }
    };
    etf::put_map_header(&mut a, 2);
    etf::put_binary(&mut a, b"a");
    etf::put_i64(&mut a, 1);
    etf::put_binary(&mut a, b"b");
    inner(&mut a, false);
    etf::put_map_header(&mut b, 2);
    etf::put_binary(&mut b, b"b");
    inner(&mut b, true);
    etf::put_binary(&mut b, b"a");
    etf::put_i64(&mut b, 1);
    assert!(terms_exactly_equal(&a, &b));
    // 1 vs 1.0, lists keep their order, values matter, malformed input.
    let one = |f: bool| {
        let mut o = Vec::new();
        if f { etf::put_f64(&mut o, 1.0) } else { etf::put_i64(&mut o, 1) }
        o
    };
    assert!(!terms_exactly_equal(&one(false), &one(true)));
    let list = |x: i64, y: i64| {
        let mut o = Vec::new();
        etf::put_list_header(&mut o, 2);
        etf::put_i64(&mut o, x);
        etf::put_i64(&mut o, y);
        etf::put_nil(&mut o);
        o
    };
    assert!(!terms_exactly_equal(&list(1, 2), &list(2, 1)));
    let mut c = b.clone();
    let last = c.len() - 1;
    c[last] = 2;
    assert!(!terms_exactly_equal(&a, &c));
    assert!(!terms_exactly_equal(&a, &a[..a.len() - 1]));
    assert!(terms_exactly_equal(&[etf::LIST, 0xFF], &[etf::LIST, 0xFF]));
    // Erlang's own encodings of the same terms: "ab" as STRING_EXT is the list [97, 98];
    // 5 as INTEGER_EXT or as a SMALL_BIG is 5; a Latin-1 atom is the UTF-8 atom.
    assert!(terms_exactly_equal(&[etf::STRING, 0, 2, b'a', b'b'], &list(97, 98)));
    assert!(!terms_exactly_equal(&[etf::STRING, 0, 2, b'b', b'a'], &list(97, 98)));
    assert!(terms_exactly_equal(&[etf::INTEGER, 0, 0, 0, 5], &[etf::SMALL_INTEGER, 5]));
    assert!(terms_exactly_equal(&[etf::SMALL_BIG, 1, 0, 5], &[etf::SMALL_INTEGER, 5]));
    assert!(!terms_exactly_equal(&[etf::SMALL_BIG, 1, 1, 5], &[etf::SMALL_INTEGER, 5]));
    let mut ok = Vec::new();
    etf::put_atom(&mut ok, "ok");
    assert!(terms_exactly_equal(&[etf::SMALL_ATOM, 2, b'o', b'k'], &ok));
    assert!(!terms_exactly_equal(&[etf::SMALL_ATOM, 2, b'o', b'x'], &ok));
    // 0.0 and -0.0 follow the VM's =:= (equal before OTP 27, distinct from 27 on).
    let zero = |v: f64| {
        let mut o = Vec::new();
        etf::put_f64(&mut o, v);
        o
    };
    crate::pickle_etf::set_otp_release(27);
    assert!(!terms_exactly_equal(&zero(0.0), &zero(-0.0)));
    crate::pickle_etf::set_otp_release(25);
    assert!(terms_exactly_equal(&zero(0.0), &zero(-0.0)));
    assert!(!terms_exactly_equal(&zero(0.0), &zero(1.0)));
    crate::pickle_etf::set_otp_release(27);
}

#[test]
fn known_shapes_and_declines() {
    init_for_tests();
    Python::attach(|py| {
        let h = helpers(py);
        let cases = [
            c"[1, 'a', 'a', (1, 2), {'k': b'x'}, frozenset([1]), 2**70, -2**63, None, True, 1.5]",
            c"{'a': [], 'b': {}, 'c': (), 'd': set(), 'e': bytearray(b'z'), 'f': float('nan')}",
            c"[[]] * 1 + ['s' * 70000, b'b' * 70000, list(range(2500))]",
        ];
        for src in cases {
            let obj = py.eval(src, None, None).unwrap();
            let mut out = Vec::new();
            pickle_to_etf(&dumps(&h, &obj).unwrap(), &mut out).unwrap_or_else(|e| panic!("{src:?}: {e:?}"));
            assert_eq!(Some(out), encode(&obj), "{src:?}");
        }
        for (src, why) in [
            (c"{'a': 1, b'a': 2}", "keys collide once encoded"),
            (c"{1, 2}", "set of several elements: its order is not known"),
            (c"__import__('decimal').Decimal(1)", "global other than erlang.OpaqueTerm/SharedDictHandle"),
        ] {
            let obj = py.eval(src, None, None).unwrap();
            assert_eq!(pickle_to_etf(&dumps(&h, &obj).unwrap(), &mut Vec::new()), Err(Declined(why)), "{src:?}");
        }
        // A pickle that sets a key twice: Python keeps one key, so the Rust path declines.
        let twice = [0x80, 5, b'}', b'K', 1, b'K', 1, b's', b'K', 1, b'K', 2, b's', b'.'];
        assert!(pickle_to_etf(&twice, &mut Vec::new()).is_err());
        // An OpaqueTerm whose MAC is wrong: Python raises, the Rust path declines.
        let mut pid = vec![131, etf::NEW_PID, etf::SMALL_ATOM_UTF8, 1, b'n'];
        pid.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut p = etf_to_pickle(&pid).unwrap();
        let mac_at = p.len() - 2 - 16;
        p[mac_at] ^= 1;
        assert!(loads(&h, &p).is_err());
        assert_eq!(pickle_to_etf(&p, &mut Vec::new()), Err(Declined("OpaqueTerm with a bad MAC")));
    });
}
