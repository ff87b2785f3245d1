//! The pickle form of the value model: read by running the opcodes CPython's pickler emits
//! for plain data (on an explicit stack), written as a plain protocol-5 pickle.

use super::*;

// ---------------------------------------------------------------------------------------
// Pickle → Python values (what pickle.loads builds), on an explicit stack

/// Pickle opcodes (Lib/pickle.py).
pub(super) mod op {
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

pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn bytes(&mut self, n: u64) -> R<&'a [u8]> {
        if n > self.remaining() as u64 {
            return decline("truncated pickle");
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    pub(super) fn u8(&mut self) -> R<u8> {
        Ok(self.bytes(1)?[0])
    }

    pub(super) fn arr<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N as u64)?);
        Ok(a)
    }

    pub(super) fn u16(&mut self) -> R<u16> {
        Ok(u16::from_le_bytes(self.arr()?))
    }

    pub(super) fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    pub(super) fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
}

/// An integer opcode's value; `Ok(None)` when `code` is not one.
pub(super) fn read_int(c: &mut Cursor<'_>, code: u8) -> R<Option<Int>> {
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
pub(super) enum Memo<'a> {
    Value(V<'a>),
    Other,
}

pub(super) struct Machine<'a> {
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
pub(super) fn u64_of_big(i: &Int) -> Option<u64> {
    let b = i.twos();
    if i.is_negative() || b.len() > 9 || (b.len() == 9 && b[8] != 0) {
        return None;
    }
    let mut buf = [0u8; 8];
    buf[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
    Some(u64::from_le_bytes(buf))
}

/// The kind of a well-formed opaque term's bytes, as `OpaqueTerm::new_checked` decides it.
pub(super) fn opaque_kind(bytes: &[u8]) -> Option<&'static str> {
    let kind = kind_of_tag(*bytes.first()?)?;
    let mut r = Reader::new(bytes);
    etf::skip_term(&mut r, 0, Limits::PAYLOAD).ok()?;
    r.expect_end().ok()?;
    Some(kind)
}

pub(super) fn unpickle(pickle: &[u8]) -> R<V<'_>> {
    let mut c = Cursor::new(pickle);
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
// Python values → pickle (a plain protocol-5 form: no frames, no memo)

pub(super) fn put_pickle(v: &V<'_>, out: &mut Vec<u8>) -> R<()> {
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

pub(super) fn put_sized(out: &mut Vec<u8>, short: u8, long: u8, long8: u8, data: &[u8]) {
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

pub(super) fn put_global(out: &mut Vec<u8>, name: &str) {
    put_sized(out, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8, b"erlang");
    put_sized(out, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8, name.as_bytes());
    out.push(op::STACK_GLOBAL);
}
