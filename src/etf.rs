//! Low-level Erlang external term format: tags, a bounds-checked reader, a structural
//! validator and small writers.
//!
//! Everything that reads untrusted bytes goes through [`Reader`], which never indexes past
//! the end of its buffer and never trusts a length field further than the bytes that are
//! actually present. [`skip_term`] walks one term without building anything; it is what makes
//! `eetf` safe to call on request envelopes (eetf 0.12 panics on tags 68/82, pre-allocates
//! whatever a count field claims and recurses without bound) and what delimits opaque terms
//! (pids, references, ports, funs) that are carried through Python byte for byte.

use std::fmt;

pub const VERSION: u8 = 131;

pub const NEW_FLOAT: u8 = 70;
pub const BIT_BINARY: u8 = 77;
pub const COMPRESSED: u8 = 80;
pub const NEW_PID: u8 = 88;
pub const NEW_PORT: u8 = 89;
pub const NEWER_REFERENCE: u8 = 90;
pub const SMALL_INTEGER: u8 = 97;
pub const INTEGER: u8 = 98;
pub const FLOAT: u8 = 99;
pub const ATOM: u8 = 100;
pub const REFERENCE: u8 = 101;
pub const PORT: u8 = 102;
pub const PID: u8 = 103;
pub const SMALL_TUPLE: u8 = 104;
pub const LARGE_TUPLE: u8 = 105;
pub const NIL: u8 = 106;
pub const STRING: u8 = 107;
pub const LIST: u8 = 108;
pub const BINARY: u8 = 109;
pub const SMALL_BIG: u8 = 110;
pub const LARGE_BIG: u8 = 111;
pub const NEW_FUN: u8 = 112;
pub const EXPORT: u8 = 113;
pub const NEW_REFERENCE: u8 = 114;
pub const SMALL_ATOM: u8 = 115;
pub const MAP: u8 = 116;
pub const ATOM_UTF8: u8 = 118;
pub const SMALL_ATOM_UTF8: u8 = 119;
pub const V4_PORT: u8 = 120;

/// The one nesting limit of the bridge, applied in both directions: a term or a Python
/// object may nest this many containers (lists, tuples, maps) and no more.
pub const MAX_DEPTH: usize = 1000;

/// Why a byte sequence is not a term we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermError {
    /// The buffer ended inside a term, or a length field claims more bytes than remain.
    Truncated,
    /// The first byte is not the ETF version byte 131.
    BadVersion(u8),
    /// A tag that is not part of the external term format (or that only the distribution
    /// protocol uses, such as 68 and 82).
    UnknownTag(u8),
    /// Well-formed ETF that the bridge cannot represent (improper list, bitstring, ...).
    Unsupported(&'static str),
    /// Nesting deeper than the limit in force.
    TooDeep(usize),
    /// Structurally valid but semantically broken (an atom that is not UTF-8, ...).
    Invalid(&'static str),
    /// Bytes left over after a complete term.
    Trailing(usize),
}

impl fmt::Display for TermError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TermError::Truncated => write!(f, "truncated term"),
            TermError::BadVersion(v) => write!(f, "bad version byte {v}, expected 131"),
            TermError::UnknownTag(t) => write!(f, "unknown or unsupported tag {t}"),
            TermError::Unsupported(what) => write!(f, "{what}"),
            TermError::TooDeep(limit) => write!(f, "nesting deeper than {limit} levels"),
            TermError::Invalid(what) => write!(f, "{what}"),
            TermError::Trailing(n) => write!(f, "{n} bytes after the end of the term"),
        }
    }
}

pub type Result<T> = std::result::Result<T, TermError>;

/// A cursor over a byte slice whose every read is bounds-checked.
#[derive(Clone, Copy)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The bytes between two positions of this reader (used to capture opaque terms).
    pub fn slice(&self, from: usize, to: usize) -> &'a [u8] {
        &self.buf[from..to]
    }

    pub fn peek(&self) -> Result<u8> {
        self.buf.get(self.pos).copied().ok_or(TermError::Truncated)
    }

    pub fn u8(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(TermError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_be_bytes(self.array()?))
    }

    /// Reads an element count and checks it against the bytes left: every element takes at
    /// least `min_bytes_each` bytes, so a count that cannot fit is rejected before anything
    /// is allocated for it.
    pub fn count(&mut self, raw: u32, min_bytes_each: usize) -> Result<usize> {
        let n = raw as usize;
        if n.saturating_mul(min_bytes_each) > self.remaining() {
            return Err(TermError::Truncated);
        }
        Ok(n)
    }

    pub fn expect_version(&mut self) -> Result<()> {
        match self.u8()? {
            VERSION => Ok(()),
            other => Err(TermError::BadVersion(other)),
        }
    }

    pub fn expect_end(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(TermError::Trailing(n)),
        }
    }

    /// Reads the name bytes of an atom whose tag has already been consumed.
    pub fn atom_body(&mut self, tag: u8) -> Result<&'a [u8]> {
        let len = match tag {
            ATOM | ATOM_UTF8 => self.u16()? as usize,
            SMALL_ATOM | SMALL_ATOM_UTF8 => self.u8()? as usize,
            _ => return Err(TermError::UnknownTag(tag)),
        };
        self.bytes(len)
    }
}

/// Reads a BINARY_EXT if that is what comes next (`None` otherwise; the caller rewinds).
pub fn probe_binary<'a>(r: &mut Reader<'a>) -> Option<&'a [u8]> {
    if r.u8().ok()? != BINARY {
        return None;
    }
    let n = r.u32().ok()? as usize;
    r.bytes(n).ok()
}

/// Reads a non-negative integer that fits in a u64 if that is what comes next.
pub fn probe_uint(r: &mut Reader<'_>) -> Option<u64> {
    match r.u8().ok()? {
        SMALL_INTEGER => Some(r.u8().ok()? as u64),
        INTEGER => u64::try_from(r.i32().ok()?).ok(),
        SMALL_BIG => {
            let n = r.u8().ok()? as usize;
            if r.u8().ok()? != 0 || n > 8 {
                return None;
            }
            let mut buf = [0u8; 8];
            buf[..n].copy_from_slice(r.bytes(n).ok()?);
            Some(u64::from_le_bytes(buf))
        }
        _ => None,
    }
}

pub fn is_atom_tag(tag: u8) -> bool {
    matches!(tag, ATOM | ATOM_UTF8 | SMALL_ATOM | SMALL_ATOM_UTF8)
}

/// Limits for [`skip_term`].
#[derive(Clone, Copy)]
pub struct Limits {
    pub max_depth: usize,
    /// Largest element count accepted for a list, tuple or map.
    pub max_count: usize,
}

impl Limits {
    /// For request envelopes: shallow, few elements, so that eetf's eager allocation
    /// (`Vec::with_capacity(count)` of 56-byte nodes) stays small.
    pub const ENVELOPE: Limits = Limits { max_depth: 16, max_count: 65_536 };
    /// For payloads: the bridge-wide nesting limit, counts bounded only by the bytes present.
    pub const PAYLOAD: Limits = Limits { max_depth: MAX_DEPTH, max_count: usize::MAX };
}

/// The bytes of the complete term that starts where `start` stands (`r` may have read its
/// tag already), checked as [`skip_term`] checks them; `r` ends up just after the term.
pub fn term_bytes<'a>(r: &mut Reader<'a>, start: Reader<'a>, depth: usize, limits: Limits) -> Result<&'a [u8]> {
    *r = start;
    let from = r.pos();
    skip_term(r, depth, limits)?;
    Ok(r.slice(from, r.pos()))
}

/// Skips one complete term (tag included), checking structure, lengths and depth.
///
/// `depth` is the number of containers already entered around this term.
pub fn skip_term(r: &mut Reader<'_>, depth: usize, limits: Limits) -> Result<()> {
    let tag = r.u8()?;
    match tag {
        SMALL_INTEGER => r.bytes(1).map(drop),
        INTEGER => r.bytes(4).map(drop),
        NEW_FLOAT => r.bytes(8).map(drop),
        FLOAT => r.bytes(31).map(drop),
        ATOM | ATOM_UTF8 | SMALL_ATOM | SMALL_ATOM_UTF8 => r.atom_body(tag).map(drop),
        SMALL_BIG => {
            let n = r.u8()? as usize;
            r.bytes(1 + n).map(drop)
        }
        LARGE_BIG => {
            let n = r.u32()? as usize;
            r.bytes(1).and_then(|_| r.bytes(n)).map(drop)
        }
        BINARY => {
            let n = r.u32()? as usize;
            r.bytes(n).map(drop)
        }
        BIT_BINARY => {
            let n = r.u32()? as usize;
            r.bytes(1 + n).map(drop)
        }
        STRING => {
            let n = r.u16()? as usize;
            r.bytes(n).map(drop)
        }
        NIL => Ok(()),
        SMALL_TUPLE | LARGE_TUPLE | LIST | MAP => skip_container(r, tag, depth, limits),
        PID | NEW_PID => {
            skip_node(r)?;
            r.bytes(if tag == PID { 9 } else { 12 }).map(drop)
        }
        PORT | NEW_PORT | V4_PORT => {
            skip_node(r)?;
            r.bytes(match tag {
                PORT => 5,
                NEW_PORT => 8,
                _ => 12,
            })
            .map(drop)
        }
        REFERENCE => {
            skip_node(r)?;
            r.bytes(5).map(drop)
        }
        NEW_REFERENCE | NEWER_REFERENCE => {
            let words = r.u16()? as usize;
            if words > 5 {
                return Err(TermError::Invalid("reference with more than 5 id words"));
            }
            skip_node(r)?;
            let creation = if tag == NEW_REFERENCE { 1 } else { 4 };
            r.bytes(creation + 4 * words).map(drop)
        }
        NEW_FUN => skip_new_fun(r, depth, limits),
        EXPORT => {
            for _ in 0..3 {
                if depth + 1 > limits.max_depth {
                    return Err(TermError::TooDeep(limits.max_depth));
                }
                skip_term(r, depth + 1, limits)?;
            }
            Ok(())
        }
        other => Err(TermError::UnknownTag(other)),
    }
}

/// NEW_FUN_EXT: Size, Arity, Uniq[16], Index, NumFree, Module, OldIndex, OldUniq, Pid,
/// FreeVars. Its parts are checked one by one (not just skipped by Size): eetf decodes them
/// and pre-allocates NumFree entries, and the free variables are terms of their own that
/// must obey the same tag and depth rules.
fn skip_new_fun(r: &mut Reader<'_>, depth: usize, limits: Limits) -> Result<()> {
    let start = r.pos() - 1;
    let size = r.u32()? as usize;
    r.bytes(1 + 16 + 4)?;
    let num_free = r.u32()?;
    let num_free = r.count(num_free, 1)?;
    if num_free > limits.max_count {
        return Err(TermError::Invalid("fun has too many free variables"));
    }
    let inner = depth + 1;
    if inner > limits.max_depth {
        return Err(TermError::TooDeep(limits.max_depth));
    }
    let module = r.u8()?;
    if !is_atom_tag(module) {
        return Err(TermError::Invalid("fun module is not an atom"));
    }
    r.atom_body(module)?;
    for _ in 0..3 + num_free {
        skip_term(r, inner, limits)?;
    }
    // Size counts from the tag byte's successor, i.e. it includes itself.
    if r.pos() - start - 1 != size {
        return Err(TermError::Invalid("fun size field does not match its contents"));
    }
    Ok(())
}

fn skip_node(r: &mut Reader<'_>) -> Result<()> {
    let tag = r.u8()?;
    if !is_atom_tag(tag) {
        return Err(TermError::Invalid("node name is not an atom"));
    }
    r.atom_body(tag).map(drop)
}

fn skip_container(r: &mut Reader<'_>, tag: u8, depth: usize, limits: Limits) -> Result<()> {
    if depth + 1 > limits.max_depth {
        return Err(TermError::TooDeep(limits.max_depth));
    }
    let raw = match tag {
        SMALL_TUPLE => r.u8()? as u32,
        _ => r.u32()?,
    };
    let per_elem = if tag == MAP { 2 } else { 1 };
    let n = r.count(raw, per_elem)?;
    if n > limits.max_count {
        return Err(TermError::Invalid("container has too many elements"));
    }
    for _ in 0..n * per_elem {
        skip_term(r, depth + 1, limits)?;
    }
    if tag == LIST {
        // The tail: anything but [] makes an improper list; still skip it for structure.
        skip_term(r, depth + 1, limits)?;
    }
    Ok(())
}

/// Checks that `buf` holds exactly one versioned term within `limits`.
pub fn validate(buf: &[u8], limits: Limits) -> Result<()> {
    let mut r = Reader::new(buf);
    r.expect_version()?;
    skip_term(&mut r, 0, limits)?;
    r.expect_end()
}

// ---------------------------------------------------------------------------------------
// Writers. These never emit STRING_EXT: lists are always LIST_EXT, whatever they hold.

pub fn put_atom(out: &mut Vec<u8>, name: &str) {
    // Atom names are limited to 255 characters; callers pass short, known names, and
    // anything longer (an exotic exception class name) is cut on a char boundary.
    let mut end = name.len().min(255);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &name.as_bytes()[..end];
    out.push(SMALL_ATOM_UTF8);
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    if (0..=255).contains(&v) {
        out.push(SMALL_INTEGER);
        out.push(v as u8);
    } else if let Ok(small) = i32::try_from(v) {
        out.push(INTEGER);
        out.extend_from_slice(&small.to_be_bytes());
    } else {
        put_big(out, v < 0, &v.unsigned_abs().to_le_bytes());
    }
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    match i64::try_from(v) {
        Ok(i) => put_i64(out, i),
        Err(_) => put_big(out, false, &v.to_le_bytes()),
    }
}

/// Writes a bignum from its little-endian magnitude (trailing zero bytes are trimmed).
pub fn put_big(out: &mut Vec<u8>, negative: bool, magnitude_le: &[u8]) {
    let len = magnitude_le.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let digits = &magnitude_le[..len];
    if digits.len() < 256 {
        out.push(SMALL_BIG);
        out.push(digits.len() as u8);
    } else {
        out.push(LARGE_BIG);
        out.extend_from_slice(&(digits.len() as u32).to_be_bytes());
    }
    out.push(negative as u8);
    out.extend_from_slice(digits);
}

pub fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.push(NEW_FLOAT);
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_binary(out: &mut Vec<u8>, data: &[u8]) {
    out.push(BINARY);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn put_tuple_header(out: &mut Vec<u8>, arity: usize) {
    if arity < 256 {
        out.push(SMALL_TUPLE);
        out.push(arity as u8);
    } else {
        out.push(LARGE_TUPLE);
        out.extend_from_slice(&(arity as u32).to_be_bytes());
    }
}

/// Writes a list header for `n > 0` elements; the caller writes them and then [`put_nil`].
pub fn put_list_header(out: &mut Vec<u8>, n: usize) {
    out.push(LIST);
    out.extend_from_slice(&(n as u32).to_be_bytes());
}

pub fn put_nil(out: &mut Vec<u8>) {
    out.push(NIL);
}

pub fn put_map_header(out: &mut Vec<u8>, n: usize) {
    out.push(MAP);
    out.extend_from_slice(&(n as u32).to_be_bytes());
}

/// Writes a list of binaries (a common reply shape: keys, sys.path entries).
pub fn put_binary_list<'a>(out: &mut Vec<u8>, items: impl ExactSizeIterator<Item = &'a [u8]>) {
    let n = items.len();
    if n > 0 {
        put_list_header(out, n);
        for item in items {
            put_binary(out, item);
        }
    }
    put_nil(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versioned(body: &[u8]) -> Vec<u8> {
        let mut v = vec![VERSION];
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn huge_list_count_is_rejected_without_allocating() {
        // The 6-byte frame that made eetf allocate 240 GB.
        let buf = versioned(&[LIST, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(validate(&buf, Limits::PAYLOAD), Err(TermError::Truncated));
    }

    #[test]
    fn distribution_tags_are_unknown() {
        for tag in [68u8, 82] {
            let buf = versioned(&[tag, 0, 0]);
            assert_eq!(validate(&buf, Limits::PAYLOAD), Err(TermError::UnknownTag(tag)));
        }
    }

    #[test]
    fn depth_is_bounded_without_recursing_past_the_limit() {
        let mut body = Vec::new();
        for _ in 0..100_000 {
            body.extend_from_slice(&[LIST, 0, 0, 0, 1]);
        }
        body.push(NIL);
        for _ in 0..100_000 {
            body.push(NIL);
        }
        let buf = versioned(&body);
        assert_eq!(validate(&buf, Limits::PAYLOAD), Err(TermError::TooDeep(MAX_DEPTH)));
    }

    #[test]
    fn exactly_the_limit_is_accepted() {
        let mut body = Vec::new();
        for _ in 0..MAX_DEPTH {
            body.extend_from_slice(&[LIST, 0, 0, 0, 1]);
        }
        body.push(NIL);
        for _ in 0..MAX_DEPTH {
            body.push(NIL);
        }
        assert_eq!(validate(&versioned(&body), Limits::PAYLOAD), Ok(()));
    }

    #[test]
    fn truncated_and_trailing_bytes() {
        assert_eq!(validate(&versioned(&[BINARY, 0, 0, 0, 9, 1]), Limits::PAYLOAD), Err(TermError::Truncated));
        assert_eq!(validate(&versioned(&[NIL, NIL]), Limits::PAYLOAD), Err(TermError::Trailing(1)));
        assert_eq!(validate(&[130, NIL], Limits::PAYLOAD), Err(TermError::BadVersion(130)));
        assert_eq!(validate(&[], Limits::PAYLOAD), Err(TermError::Truncated));
    }

    #[test]
    fn envelope_limits_bound_counts() {
        let mut body = vec![LIST];
        body.extend_from_slice(&70_000u32.to_be_bytes());
        body.extend(std::iter::repeat(NIL).take(70_001));
        assert!(validate(&versioned(&body), Limits::ENVELOPE).is_err());
        assert_eq!(validate(&versioned(&body), Limits::PAYLOAD), Ok(()));
    }

    /// `term_to_binary(fun(Y) -> X + Y end)` with X = 5, from erl (OTP 25).
    const REAL_FUN: &[u8] = &[131,112,0,0,0,186,1,6,83,97,170,70,21,144,209,189,241,235,98,209,166,235,8,0,0,0,42,0,0,0,1,119,8,101,114,108,95,101,118,97,108,97,42,98,0,50,155,13,88,119,13,110,111,110,111,100,101,64,110,111,104,111,115,116,0,0,0,9,0,0,0,0,0,0,0,0,104,6,97,1,108,0,0,0,1,104,2,119,1,88,97,5,106,119,4,110,111,110,101,119,4,110,111,110,101,116,0,0,0,0,108,0,0,0,1,104,5,119,6,99,108,97,117,115,101,97,1,108,0,0,0,1,104,3,119,3,118,97,114,97,1,119,1,89,106,106,108,0,0,0,1,104,5,119,2,111,112,97,1,119,1,43,104,3,119,3,118,97,114,97,1,119,1,88,104,3,119,3,118,97,114,97,1,119,1,89,106,106];

    #[test]
    fn real_fun_validates_and_lying_fun_fields_do_not() {
        assert_eq!(validate(REAL_FUN, Limits::PAYLOAD), Ok(()));
        assert_eq!(validate(REAL_FUN, Limits::ENVELOPE), Ok(()));
        // NumFree inflated to 0xFFFFFFFF: the input eetf answered by allocating 240 GB.
        let mut huge = REAL_FUN.to_vec();
        huge[27..31].copy_from_slice(&[0xFF; 4]);
        assert!(validate(&huge, Limits::ENVELOPE).is_err());
        // A Size field that disagrees with the contents.
        let mut lying = REAL_FUN.to_vec();
        lying[5] = 185;
        assert!(validate(&lying, Limits::PAYLOAD).is_err());
        // A distribution tag hidden among the free variables.
        let mut hidden = REAL_FUN.to_vec();
        let env_at = REAL_FUN.len() - 1 - 0; // last byte is the NIL ending the free var's list
        hidden[env_at] = 82;
        assert!(validate(&hidden, Limits::PAYLOAD).is_err());
    }

    #[test]
    fn integer_writers_pick_the_smallest_encoding() {
        let mut out = Vec::new();
        put_i64(&mut out, 7);
        assert_eq!(out, [SMALL_INTEGER, 7]);
        out.clear();
        put_i64(&mut out, -1);
        assert_eq!(out, [INTEGER, 255, 255, 255, 255]);
        out.clear();
        put_i64(&mut out, i64::MIN);
        assert_eq!(out, [SMALL_BIG, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0x80]);
        out.clear();
        put_u64(&mut out, u64::MAX);
        assert_eq!(out, [SMALL_BIG, 8, 0, 255, 255, 255, 255, 255, 255, 255, 255]);
    }

    #[test]
    fn long_lists_of_small_integers_are_never_string_ext() {
        // eetf writes such lists as STRING_EXT (losing signs) and corrupts ByteLists over
        // 65,535 elements; our writer has no such path.
        let mut out = Vec::new();
        put_list_header(&mut out, 70_000);
        for i in 0..70_000i64 {
            put_i64(&mut out, i % 256);
        }
        put_nil(&mut out);
        assert_eq!(out[0], LIST);
        assert_eq!(validate(&versioned(&out), Limits::PAYLOAD), Ok(()));
    }
}
