//! Tests of the conversions, and an on-demand measurement of their cost.

use super::*;
use crate::protocol::BYTES_TAG;
use crate::pymodule::OpaqueTerm;
use crate::python::init_for_tests;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList};

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
