//! Python integers of any size, as the pickle and ETF forms carry them.

use super::*;

/// A signed integer of any size: an `i64`, or beyond it the minimal two's-complement
/// little-endian bytes (exactly the payload of pickle's LONG1/LONG4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Int(IntRepr);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum IntRepr {
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
    pub(super) fn from_twos(bytes: &[u8]) -> Int {
        let mut v = bytes.to_vec();
        trim_twos(&mut v);
        Int::from_trimmed(v)
    }

    pub(super) fn from_trimmed(v: Vec<u8>) -> Int {
        if v.len() <= 8 {
            let fill = if v.last().is_some_and(|&b| b & 0x80 != 0) { 0xFF } else { 0 };
            let mut buf = [fill; 8];
            buf[..v.len()].copy_from_slice(&v);
            Int(IntRepr::Small(i64::from_le_bytes(buf)))
        } else {
            Int(IntRepr::Big(v))
        }
    }

    pub(super) fn from_sign_magnitude(negative: bool, magnitude_le: &[u8]) -> Int {
        let mut v = magnitude_le.to_vec();
        v.push(0);
        if negative {
            negate_twos(&mut v);
        }
        trim_twos(&mut v);
        Int::from_trimmed(v)
    }

    /// The minimal two's-complement little-endian bytes (empty for 0).
    pub(super) fn twos(&self) -> Cow<'_, [u8]> {
        match &self.0 {
            IntRepr::Small(v) => {
                let mut b = v.to_le_bytes().to_vec();
                trim_twos(&mut b);
                Cow::Owned(b)
            }
            IntRepr::Big(b) => Cow::Borrowed(b),
        }
    }

    pub(super) fn as_i64(&self) -> Option<i64> {
        match self.0 {
            IntRepr::Small(v) => Some(v),
            IntRepr::Big(_) => None,
        }
    }

    pub(super) fn is_negative(&self) -> bool {
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
    pub(super) fn put_pickle(&self, out: &mut Vec<u8>) {
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
pub(super) fn trim_twos(v: &mut Vec<u8>) {
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
pub(super) fn negate_twos(v: &mut Vec<u8>) {
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
pub(super) fn int_of_integral_float(f: f64) -> Int {
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
