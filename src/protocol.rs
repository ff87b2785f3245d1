//! Request envelopes (Erlang → port) and reply frames (port → Erlang).
//!
//! Envelopes are small tuples (see docs/PROTOCOL.md). They are validated with
//! [`etf::validate`] under tight limits first and only then handed to `eetf`, whose decoder
//! would otherwise panic on tags 68/82, pre-allocate unchecked counts and recurse without
//! bound. Payloads stay opaque byte strings here: they are decoded straight into Python
//! objects by `convert`.

use crate::etf::{self, Limits, TermError};
use eetf::{Atom, Binary, FixInteger, Pid, Term, Tuple};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The process that owns state (a namespace, dicts) in the port.
pub type Owner = Pid;

/// A process for the logs: `<Id.Serial> on node` (the node's own `<0.Id.Serial>` form needs
/// to know which node is local, which the port does not).
pub fn describe_pid(p: &Owner) -> String {
    format!("<{}.{}> on {}", p.id, p.serial, p.node.name)
}

/// A SharedDict handle as it travels in a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handle {
    pub generation: u64,
    pub id: u64,
    pub token: Vec<u8>,
}

pub const HANDLE_TAG: &str = "$pyport_shared_dict";
pub const BYTES_TAG: &str = "$pyport_bytes";

/// A tuple the protocol gives a meaning of its own, as its ETF holds it.
pub enum Tagged<'a> {
    /// `{'$pyport_bytes', Bin}`: `Bin` is Python `bytes`.
    Bytes(&'a [u8]),
    /// `{'$pyport_shared_dict', Generation, Id, Token}`: a SharedDict handle.
    Handle { generation: u64, id: u64, token: &'a [u8] },
}

/// Reads a tagged tuple of `arity` elements, `r` just past the tuple's header: moves `r`
/// past it when it is one, and leaves `r` untouched when it is an ordinary tuple. Both
/// converters (`convert` to Python, `pickle_etf` to pickles) read tagged tuples here.
pub fn probe_tagged<'a>(r: &mut etf::Reader<'a>, arity: usize) -> Result<Option<Tagged<'a>>, TermError> {
    if arity != 2 && arity != 4 {
        return Ok(None);
    }
    let mut probe = *r;
    let tag = probe.u8()?;
    if !etf::is_atom_tag(tag) {
        return Ok(None);
    }
    let name = probe.atom_body(tag)?;
    let tagged = match (arity, name) {
        (2, n) if n == BYTES_TAG.as_bytes() => etf::probe_binary(&mut probe).map(Tagged::Bytes),
        (4, n) if n == HANDLE_TAG.as_bytes() => (|| {
            let generation = etf::probe_uint(&mut probe)?;
            let id = etf::probe_uint(&mut probe)?;
            let token = etf::probe_binary(&mut probe)?;
            Some(Tagged::Handle { generation, id, token })
        })(),
        _ => None,
    };
    if tagged.is_some() {
        *r = probe;
    }
    Ok(tagged)
}

#[derive(Debug)]
pub enum Request {
    /// `chain`: the callback whose Erlang function made this request (see `callbacks`).
    Call { id: u64, owner: Owner, module: String, function: String, payload: Vec<u8>, chain: Option<u64> },
    Eval { id: u64, owner: Owner, code: String, payload: Vec<u8>, chain: Option<u64> },
    Exec { id: u64, owner: Owner, code: String, payload: Vec<u8>, chain: Option<u64> },
    /// Starts a stream: `key` names it (an Erlang reference's external format), `to` gets
    /// its items, at most `window` unacknowledged.
    StreamStart {
        id: u64,
        caller: Owner,
        module: String,
        function: String,
        payload: Vec<u8>,
        key: Vec<u8>,
        to: Owner,
        window: u64,
    },
    StreamAck { key: Vec<u8>, n: u64 },
    StreamCancel { key: Vec<u8> },
    /// The answer to a callback: `ok` with the result's term, or an error term.
    CallbackReply { id: u64, ok: bool, payload: Vec<u8> },
    Startup { id: u64, sys_path: Vec<String>, code: String },
    Stats { id: u64 },
    SdNew { id: u64, owner: Owner },
    SdGet { id: u64, handle: Handle, key: Vec<u8> },
    SdSet { id: u64, handle: Handle, key: Vec<u8>, payload: Vec<u8> },
    SdDel { id: u64, handle: Handle, key: Vec<u8> },
    SdKeys { id: u64, handle: Handle },
    SdDestroy { id: u64, handle: Handle },
    /// `incr` is a versioned ETF integer (any size).
    SdUpdateCounter { id: u64, handle: Handle, key: Vec<u8>, incr: Vec<u8> },
    /// `old`: `None` for "only if absent", else a versioned ETF term; `new` likewise a term.
    SdCompareAndSwap { id: u64, handle: Handle, key: Vec<u8>, old: Option<Vec<u8>>, new: Vec<u8> },
    /// `caller`, when given, must own the dict (as only the owner may `ets:give_away/3`).
    SdGiveAway { id: u64, handle: Handle, owner: Owner, caller: Option<Owner> },
    /// Walk the whole SharedDict store and answer what is inconsistent (tests, diagnosis).
    SdCheck { id: u64 },
    /// Destroy every dict these (dead) processes own.
    SdDropOwners { id: u64, owners: Vec<Owner> },
    /// The VM applied the cache invalidation `token` (a change waits for it).
    SdInvalidated { token: u64 },
    Cancel { id: u64 },
    Heartbeat { seq: u64 },
    OwnerDown { owner: Owner },
    /// The VM delivered `n` `erlang.send` messages of `bytes` bytes in all (`None`: it lost
    /// count, every message sent so far is settled).
    Sent { delivered: Option<(u64, u64)> },
    /// The names of every Erlang function registered now (those that are UTF-8).
    Functions { names: Vec<String> },
    /// Python's root logger level and the format of forwarded records (`undefined`: the
    /// default format).
    ConfigureLogging { id: u64, level: u64, format: Option<String> },
}

/// Why an envelope was refused. `id` is known when the envelope got far enough to name it,
/// so the error can be routed to the waiting caller.
#[derive(Debug)]
pub struct BadRequest {
    pub id: Option<u64>,
    pub reason: BadReason,
}

#[derive(Debug)]
pub enum BadReason {
    Term(TermError),
    Shape(String),
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReason::Term(e) => write!(f, "{e}"),
            BadReason::Shape(s) => f.write_str(s),
        }
    }
}

impl BadRequest {
    /// The Erlang error reason for this refusal.
    pub fn to_term(&self) -> Term {
        match &self.reason {
            BadReason::Term(e) => term_error_reason(e),
            BadReason::Shape(s) => tuple(vec![atom("bad_request"), binary(s.as_bytes())]),
        }
    }
}

fn shape(id: Option<u64>, msg: impl Into<String>) -> BadRequest {
    BadRequest { id, reason: BadReason::Shape(msg.into()) }
}

/// Decodes one request frame body.
pub fn decode_request(frame: &[u8]) -> Result<Request, BadRequest> {
    etf::validate(frame, Limits::ENVELOPE)
        .map_err(|e| BadRequest { id: None, reason: BadReason::Term(e) })?;
    let term = Term::decode(frame)
        .map_err(|e| shape(None, format!("undecodable envelope: {e}")))?;
    let Term::Tuple(Tuple { elements }) = term else {
        return Err(shape(None, "request is not a tuple"));
    };
    let op = match elements.first() {
        Some(Term::Atom(a)) => a.name.as_str(),
        _ => return Err(shape(None, "request does not start with an atom")),
    };
    // The id, where the request has one, is always the second element.
    let id = elements.get(1).and_then(as_u64);
    let f = Fields { op, id, elems: &elements };
    match (op, elements.len()) {
        ("call", 6) | ("call", 7) => Ok(Request::Call {
            id: f.id()?,
            owner: f.pid(2)?,
            module: f.string(3)?,
            function: f.string(4)?,
            payload: f.bytes(5)?,
            chain: f.chain(6)?,
        }),
        ("eval", 5) | ("exec", 5) | ("eval", 6) | ("exec", 6) => {
            let (id, owner, code, payload, chain) = (f.id()?, f.pid(2)?, f.string(3)?, f.bytes(4)?, f.chain(5)?);
            Ok(if op == "eval" {
                Request::Eval { id, owner, code, payload, chain }
            } else {
                Request::Exec { id, owner, code, payload, chain }
            })
        }
        ("stream_start", 9) => Ok(Request::StreamStart {
            id: f.id()?,
            caller: f.pid(2)?,
            module: f.string(3)?,
            function: f.string(4)?,
            payload: f.bytes(5)?,
            key: f.reference(6)?,
            to: f.pid(7)?,
            window: elements.get(8).and_then(as_u64).filter(|w| (1..=1 << 20).contains(w)).ok_or_else(|| f.bad(8, "a window of 1 to 2^20"))?,
        }),
        ("stream_ack", 3) => Ok(Request::StreamAck {
            key: f.reference(1)?,
            n: elements.get(2).and_then(as_u64).ok_or_else(|| f.bad(2, "a count"))?,
        }),
        ("stream_cancel", 2) => Ok(Request::StreamCancel { key: f.reference(1)? }),
        ("callback_reply", 4) => Ok(Request::CallbackReply {
            id: f.id()?,
            ok: match elements.get(2) {
                Some(Term::Atom(a)) if a.name == "ok" => true,
                Some(Term::Atom(a)) if a.name == "error" => false,
                _ => return Err(f.bad(2, "ok or error")),
            },
            payload: f.bytes(3)?,
        }),
        ("startup", 4) => Ok(Request::Startup { id: f.id()?, sys_path: f.string_list(2)?, code: f.string(3)? }),
        ("stats", 2) => Ok(Request::Stats { id: f.id()? }),
        ("sd_new", 3) => Ok(Request::SdNew { id: f.id()?, owner: f.pid(2)? }),
        ("sd_get", 4) => Ok(Request::SdGet { id: f.id()?, handle: f.handle(2)?, key: f.bytes(3)? }),
        ("sd_set", 5) => Ok(Request::SdSet {
            id: f.id()?,
            handle: f.handle(2)?,
            key: f.bytes(3)?,
            payload: f.bytes(4)?,
        }),
        ("sd_del", 4) => Ok(Request::SdDel { id: f.id()?, handle: f.handle(2)?, key: f.bytes(3)? }),
        ("sd_keys", 3) => Ok(Request::SdKeys { id: f.id()?, handle: f.handle(2)? }),
        ("sd_destroy", 3) => Ok(Request::SdDestroy { id: f.id()?, handle: f.handle(2)? }),
        ("sd_update_counter", 5) => Ok(Request::SdUpdateCounter {
            id: f.id()?,
            handle: f.handle(2)?,
            key: f.bytes(3)?,
            incr: f.bytes(4)?,
        }),
        ("sd_cas", 6) => Ok(Request::SdCompareAndSwap {
            id: f.id()?,
            handle: f.handle(2)?,
            key: f.bytes(3)?,
            old: match elements.get(4) {
                Some(Term::Atom(a)) if a.name == "absent" => None,
                _ => Some(f.bytes(4)?),
            },
            new: f.bytes(5)?,
        }),
        ("sd_give_away", 4) => {
            Ok(Request::SdGiveAway { id: f.id()?, handle: f.handle(2)?, owner: f.pid(3)?, caller: None })
        }
        ("sd_give_away", 5) => Ok(Request::SdGiveAway {
            id: f.id()?,
            handle: f.handle(2)?,
            owner: f.pid(3)?,
            caller: Some(f.pid(4)?),
        }),
        ("sd_check", 2) => Ok(Request::SdCheck { id: f.id()? }),
        ("sd_drop_owners", 3) => Ok(Request::SdDropOwners { id: f.id()?, owners: f.pid_list(2)? }),
        ("sd_invalidated", 2) => Ok(Request::SdInvalidated {
            token: elements.get(1).and_then(as_u64).ok_or_else(|| f.bad(1, "a token"))?,
        }),
        ("cancel", 2) => Ok(Request::Cancel { id: f.id()? }),
        ("heartbeat", 2) => Ok(Request::Heartbeat { seq: f.id()? }),
        ("owner_down", 2) => Ok(Request::OwnerDown { owner: f.pid(1)? }),
        ("sent", 3) => Ok(Request::Sent {
            delivered: Some((
                elements.get(1).and_then(as_u64).ok_or_else(|| f.bad(1, "a count"))?,
                elements.get(2).and_then(as_u64).ok_or_else(|| f.bad(2, "a byte count"))?,
            )),
        }),
        ("functions", 2) => Ok(Request::Functions { names: f.string_list(1)? }),
        ("configure_logging", 4) => Ok(Request::ConfigureLogging {
            id: f.id()?,
            level: elements.get(2).and_then(as_u64).ok_or_else(|| f.bad(2, "a level number"))?,
            format: match elements.get(3) {
                Some(Term::Atom(a)) if a.name == "undefined" => None,
                _ => Some(f.string(3)?),
            },
        }),
        ("sent", 2) => match elements.get(1) {
            Some(Term::Atom(a)) if a.name == "reset" => Ok(Request::Sent { delivered: None }),
            _ => Err(f.bad(1, "reset")),
        },
        _ => Err(shape(id, format!("unknown request {op}/{}", elements.len()))),
    }
}

/// Field accessors that turn a shape mismatch into a [`BadRequest`] naming the field.
struct Fields<'a> {
    op: &'a str,
    id: Option<u64>,
    elems: &'a [Term],
}

impl Fields<'_> {
    fn bad(&self, pos: usize, what: &str) -> BadRequest {
        shape(self.id, format!("{}: element {} must be {}", self.op, pos + 1, what))
    }

    fn id(&self) -> Result<u64, BadRequest> {
        self.id
            .filter(|id| (1..1 << 63).contains(id))
            .ok_or_else(|| self.bad(1, "an integer id from 1 to 2^63-1"))
    }

    /// `term_to_binary(Ref)` of an Erlang reference: its external format, without the
    /// version byte.
    fn reference(&self, pos: usize) -> Result<Vec<u8>, BadRequest> {
        let bytes = self.bytes(pos)?;
        let body = bytes.strip_prefix(&[etf::VERSION]).unwrap_or_default();
        let is_ref = matches!(body.first(), Some(&(etf::REFERENCE | etf::NEW_REFERENCE | etf::NEWER_REFERENCE)));
        let mut r = etf::Reader::new(body);
        if !is_ref || etf::skip_term(&mut r, 0, Limits::ENVELOPE).is_err() || r.expect_end().is_err() {
            return Err(self.bad(pos, "term_to_binary of a reference"));
        }
        Ok(body.to_vec())
    }

    /// An optional trailing chain id: absent, or a non-negative integer.
    fn chain(&self, pos: usize) -> Result<Option<u64>, BadRequest> {
        match self.elems.get(pos) {
            None => Ok(None),
            Some(t) => as_u64(t).map(Some).ok_or_else(|| self.bad(pos, "a chain id")),
        }
    }

    fn pid(&self, pos: usize) -> Result<Pid, BadRequest> {
        match &self.elems[pos] {
            Term::Pid(p) => Ok(p.clone()),
            _ => Err(self.bad(pos, "a pid")),
        }
    }

    fn pid_list(&self, pos: usize) -> Result<Vec<Pid>, BadRequest> {
        let items: &[Term] = match &self.elems[pos] {
            Term::List(l) => &l.elements,
            Term::ByteList(b) if b.bytes.is_empty() => &[],
            _ => return Err(self.bad(pos, "a list of pids")),
        };
        items
            .iter()
            .map(|t| match t {
                Term::Pid(p) => Ok(p.clone()),
                _ => Err(self.bad(pos, "a list of pids")),
            })
            .collect()
    }

    fn bytes(&self, pos: usize) -> Result<Vec<u8>, BadRequest> {
        match &self.elems[pos] {
            Term::Binary(b) => Ok(b.bytes.clone()),
            _ => Err(self.bad(pos, "a binary")),
        }
    }

    fn string(&self, pos: usize) -> Result<String, BadRequest> {
        String::from_utf8(self.bytes(pos)?).map_err(|_| self.bad(pos, "a UTF-8 binary"))
    }

    fn string_list(&self, pos: usize) -> Result<Vec<String>, BadRequest> {
        let items = match &self.elems[pos] {
            Term::List(l) => &l.elements,
            // eetf decodes an all-small-integer list as a ByteList; only [] is valid here.
            Term::ByteList(b) if b.bytes.is_empty() => return Ok(Vec::new()),
            _ => return Err(self.bad(pos, "a list of UTF-8 binaries")),
        };
        items
            .iter()
            .map(|t| match t {
                Term::Binary(b) => String::from_utf8(b.bytes.clone()).ok(),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| self.bad(pos, "a list of UTF-8 binaries"))
    }

    fn handle(&self, pos: usize) -> Result<Handle, BadRequest> {
        parse_handle(&self.elems[pos]).ok_or_else(|| self.bad(pos, "a SharedDict handle"))
    }
}

fn as_u64(t: &Term) -> Option<u64> {
    match t {
        Term::FixInteger(FixInteger { value }) => u64::try_from(*value).ok(),
        Term::BigInteger(b) => u64::try_from(&b.value).ok(),
        _ => None,
    }
}

fn parse_handle(t: &Term) -> Option<Handle> {
    let Term::Tuple(Tuple { elements }) = t else { return None };
    match elements.as_slice() {
        [Term::Atom(tag), gen, id, Term::Binary(token)] if tag.name == HANDLE_TAG => Some(Handle {
            generation: as_u64(gen)?,
            id: as_u64(id)?,
            token: token.bytes.clone(),
        }),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Building reply terms. Control replies are small and built as eetf terms; they never
// contain lists of small integers, which eetf would mis-encode as STRING_EXT.

pub fn atom(name: &str) -> Term {
    Term::Atom(Atom::from(name))
}

pub fn binary(bytes: &[u8]) -> Term {
    Term::Binary(Binary::from(bytes))
}

pub fn tuple(elements: Vec<Term>) -> Term {
    Term::Tuple(Tuple::from(elements))
}

pub fn int(v: u64) -> Term {
    match i32::try_from(v) {
        Ok(small) => Term::FixInteger(FixInteger::from(small)),
        Err(_) => Term::BigInteger(eetf::BigInteger::from(v)),
    }
}

/// The Erlang reason for a term that could not be decoded.
pub fn term_error_reason(e: &TermError) -> Term {
    match e {
        TermError::TooDeep(limit) => tuple(vec![atom("nesting_too_deep"), int(*limit as u64)]),
        TermError::Unsupported(_) => tuple(vec![atom("unsupported_term"), binary(e.to_string().as_bytes())]),
        _ => tuple(vec![atom("bad_term"), binary(e.to_string().as_bytes())]),
    }
}

fn encode_term(term: &Term) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // Encoding into a Vec cannot fail for the terms built in this module.
    if term.encode(&mut out).is_err() {
        out.clear();
        out.push(etf::VERSION);
        etf::put_atom(&mut out, "encode_failed");
    }
    out
}

/// `{Id, error, Reason}` (`Id` is `undefined` when the request could not be identified).
pub fn error_frame(id: Option<u64>, reason: Term) -> Vec<u8> {
    let id_term = id.map_or_else(|| atom("undefined"), int);
    encode_term(&tuple(vec![id_term, atom("error"), reason]))
}

/// Starts `{Id, ok, <<Payload>>}`: the caller appends the payload term (with its version
/// byte) and then calls [`finish_ok_frame`] to patch the binary's length.
pub fn begin_ok_frame(id: u64, capacity: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(capacity + 32);
    out.push(etf::VERSION);
    etf::put_tuple_header(&mut out, 3);
    etf::put_u64(&mut out, id);
    etf::put_atom(&mut out, "ok");
    out.push(etf::BINARY);
    let len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    (out, len_at)
}

pub fn finish_ok_frame(out: &mut [u8], len_at: usize) {
    let len = (out.len() - len_at - 4) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// `{Id, ok, <<Payload>>}` for a payload built by `write`, which appends one term body
/// (without a version byte).
pub fn ok_frame(id: u64, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (mut out, len_at) = begin_ok_frame(id, 64);
    out.push(etf::VERSION);
    write(&mut out);
    finish_ok_frame(&mut out, len_at);
    out
}

/// `{pyport_heartbeat, Seq}`: the answer to `{heartbeat, Seq}`, from the reader thread.
pub fn heartbeat_frame(seq: u64) -> Vec<u8> {
    encode_term(&tuple(vec![atom("pyport_heartbeat"), int(seq)]))
}

/// The largest reply frame (`--max-reply-bytes`), never over what a 4-byte length can say.
static MAX_REPLY: AtomicUsize = AtomicUsize::new(u32::MAX as usize);

/// The largest frame the port sends (`--max-reply-bytes`).
pub fn max_reply() -> usize {
    MAX_REPLY.load(Ordering::Relaxed)
}

pub fn set_max_reply(max: usize) {
    MAX_REPLY.store(max.min(u32::MAX as usize), Ordering::Relaxed);
}

/// Replaces a frame over the limit by `{Id, error, {reply_too_large, Size, Max}}`, so that
/// one huge result fails its own request and not the stream (a frame over 4 GiB cannot be
/// framed at all). Every outgoing frame passes here.
pub fn limit_reply(frame: Vec<u8>) -> Vec<u8> {
    let max = MAX_REPLY.load(Ordering::Relaxed);
    if frame.len() <= max {
        return frame;
    }
    let size = frame.len() as u64;
    let id = reply_id(&frame);
    drop(frame);
    match id {
        Some(id) => error_frame(Some(id), tuple(vec![atom("reply_too_large"), int(size), int(max as u64)])),
        None => log_frame("error", "pyport", format!("dropped a {size}-byte frame over the {max}-byte limit").as_bytes()),
    }
}

/// The id of a reply frame `{Id, ok | error, _}` as this module writes them.
fn reply_id(frame: &[u8]) -> Option<u64> {
    let rest = frame.strip_prefix(&[etf::VERSION, etf::SMALL_TUPLE, 3])?;
    match *rest.first()? {
        etf::SMALL_INTEGER => rest.get(1).map(|&b| b as u64),
        etf::INTEGER => Some(i32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as u64),
        etf::SMALL_BIG => {
            let n = *rest.get(1)? as usize;
            let (sign, digits) = (*rest.get(2)?, rest.get(3..3 + n)?);
            (sign == 0 && n <= 8).then(|| digits.iter().rev().fold(0u64, |acc, &d| (acc << 8) | d as u64))
        }
        _ => None,
    }
}

pub fn log_frame(level: &str, source: &str, message: &[u8]) -> Vec<u8> {
    encode_term(&tuple(vec![atom("pyport_log"), atom(level), atom(source), binary(message)]))
}

/// A Python `logging` record: `{pyport_log_record, Level, Logger, Module, Line, Caller, Message}`
/// with `Caller` the requesting pid or `undefined`. Names travel as binaries: nothing Python
/// chooses becomes an atom.
/// A term's external format without the version byte (an opaque term's bytes).
pub fn term_body(term: &Term) -> Vec<u8> {
    let mut v = encode_term(term);
    v.remove(0);
    v
}

/// `{pyport_callback, Id, Name, Args, Caller}`: Python asks Erlang to run the function
/// registered as `Name` with the argument list `Args` (a versioned term).
pub fn callback_frame(id: u64, name: &[u8], args: &[u8], caller: Option<&Owner>) -> Vec<u8> {
    let caller = caller.map_or_else(|| atom("undefined"), |p| Term::Pid(p.clone()));
    encode_term(&tuple(vec![atom("pyport_callback"), int(id), binary(name), binary(args), caller]))
}

/// `{pyport_sd_invalidate, Token, Handle, Key}` (`{pyport_sd_invalidate, Token, Handle}` for
/// the whole dict): the VM must forget what it caches of it, and answer `{sd_invalidated,
/// Token}` (a change waits for that).
pub fn sd_invalidate_frame(token: u64, handle: &Handle, key: Option<&[u8]>) -> Vec<u8> {
    let h = tuple(vec![atom(HANDLE_TAG), int(handle.generation), int(handle.id), binary(&handle.token)]);
    let mut elems = vec![atom("pyport_sd_invalidate"), int(token), h];
    if let Some(k) = key {
        elems.push(binary(k));
    }
    encode_term(&tuple(elems))
}

/// `{pyport_stream_end, Ref}`: the stream `Ref` (its key, an external format) is over.
pub fn stream_end_frame(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 24);
    out.push(etf::VERSION);
    etf::put_tuple_header(&mut out, 2);
    etf::put_atom(&mut out, "pyport_stream_end");
    out.extend_from_slice(key);
    out
}

/// `{pyport_stream_end, Ref, Pid, Message}`: the stream is over, and `Message` (a versioned
/// term: `done` or the error) is its last, for its owner `pid`.
pub fn stream_end_frame_with(key: &[u8], pid: &[u8], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + pid.len() + key.len() + 40);
    out.push(etf::VERSION);
    etf::put_tuple_header(&mut out, 4);
    etf::put_atom(&mut out, "pyport_stream_end");
    out.extend_from_slice(key);
    out.extend_from_slice(pid);
    etf::put_binary(&mut out, message);
    out
}

/// `{pyport_callback_cancel, Id}`: Python stopped waiting for callback `Id`.
pub fn callback_cancel_frame(id: u64) -> Vec<u8> {
    encode_term(&tuple(vec![atom("pyport_callback_cancel"), int(id)]))
}

/// `{pyport_send, Pid, Message}`: `Message` (a versioned term) for the process `Pid`, whose
/// external format (without version byte) is `pid`.
pub fn send_frame(pid: &[u8], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + pid.len() + 32);
    out.push(etf::VERSION);
    etf::put_tuple_header(&mut out, 3);
    etf::put_atom(&mut out, "pyport_send");
    out.extend_from_slice(pid);
    etf::put_binary(&mut out, message);
    out
}

/// `{pyport_stream_send, Ref, Pid, Message}`: a message of the stream named by `key` (a
/// reference's external format) for its owner `pid`. Delivered like `pyport_send`, but
/// its flow is the stream's own (not `erlang.send`'s credit).
pub fn stream_send_frame(key: &[u8], pid: &[u8], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + pid.len() + key.len() + 40);
    out.push(etf::VERSION);
    etf::put_tuple_header(&mut out, 4);
    etf::put_atom(&mut out, "pyport_stream_send");
    out.extend_from_slice(key);
    out.extend_from_slice(pid);
    etf::put_binary(&mut out, message);
    out
}

pub fn log_record_frame(level: &str, logger: &str, module: &str, line: i64, caller: Option<&Owner>, message: &[u8]) -> Vec<u8> {
    let caller = caller.map_or_else(|| atom("undefined"), |p| Term::Pid(p.clone()));
    encode_term(&tuple(vec![
        atom("pyport_log_record"),
        atom(level),
        binary(logger.as_bytes()),
        binary(module.as_bytes()),
        Term::FixInteger(eetf::FixInteger::from(line.clamp(0, i32::MAX as i64) as i32)),
        caller,
        binary(message),
    ]))
}

pub fn ready_frame(
    python: &str,
    workers: usize,
    max_workers: usize,
    generation: u64,
    builtin_exceptions: &[String],
) -> Vec<u8> {
    let mut map = std::collections::HashMap::new();
    let names: Vec<Term> = builtin_exceptions.iter().map(|n| binary(n.as_bytes())).collect();
    map.insert(atom("builtin_exceptions"), Term::List(eetf::List::from(names)));
    map.insert(atom("python"), binary(python.as_bytes()));
    map.insert(atom("os_pid"), int(std::process::id() as u64));
    map.insert(atom("workers"), int(workers as u64));
    map.insert(atom("max_workers"), int(max_workers as u64));
    map.insert(atom("generation"), int(generation));
    encode_term(&tuple(vec![atom("pyport_ready"), Term::Map(eetf::Map::from(map))]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid() -> Pid {
        Pid::new("nonode@nohost", 85, 0, 1)
    }

    fn enc(t: &Term) -> Vec<u8> {
        let mut v = Vec::new();
        t.encode(&mut v).expect("encode");
        v
    }

    #[test]
    fn call_envelope_round_trip() {
        let t = tuple(vec![
            atom("call"),
            int(42),
            Term::Pid(pid()),
            binary(b"math"),
            binary(b"sqrt"),
            binary(&[131, 106]),
        ]);
        match decode_request(&enc(&t)) {
            Ok(Request::Call { id, owner, module, function, payload, .. }) => {
                assert_eq!((id, owner, module.as_str(), function.as_str()), (42, pid(), "math", "sqrt"));
                assert_eq!(payload, vec![131, 106]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_field_names_the_id_and_field() {
        let t = tuple(vec![atom("eval"), int(7), atom("not_a_pid"), binary(b"1"), binary(b"")]);
        let err = decode_request(&enc(&t)).unwrap_err();
        assert_eq!(err.id, Some(7));
        assert!(err.reason.to_string().contains("element 3 must be a pid"), "{}", err.reason);
    }

    #[test]
    fn tags_that_crash_eetf_are_refused_before_it_runs() {
        for tag in [68u8, 82] {
            let err = decode_request(&[131, 104, 2, tag, 0, 0, 0]).unwrap_err();
            assert!(matches!(err.reason, BadReason::Term(TermError::UnknownTag(t)) if t == tag));
        }
        let err = decode_request(&[131, 108, 255, 255, 255, 255]).unwrap_err();
        assert!(matches!(err.reason, BadReason::Term(TermError::Truncated)));
    }

    #[test]
    fn latin1_atoms_decode() {
        // OTP 25's default term_to_binary writes ATOM_EXT; {stats, 1} in that form:
        let frame = [131, 104, 2, 100, 0, 5, b's', b't', b'a', b't', b's', 97, 1];
        assert!(matches!(decode_request(&frame), Ok(Request::Stats { id: 1 })));
    }

    #[test]
    fn handle_parses_and_bad_handle_is_refused() {
        let h = tuple(vec![atom(HANDLE_TAG), int(3), int(9), binary(&[1; 16])]);
        let t = tuple(vec![atom("sd_keys"), int(5), h]);
        match decode_request(&enc(&t)) {
            Ok(Request::SdKeys { id: 5, handle }) => assert_eq!(handle, Handle { generation: 3, id: 9, token: vec![1; 16] }),
            other => panic!("unexpected {other:?}"),
        }
        let t = tuple(vec![atom("sd_keys"), int(5), atom("nope")]);
        assert_eq!(decode_request(&enc(&t)).unwrap_err().id, Some(5));
    }

    #[test]
    fn oversized_replies_become_an_error_for_their_own_id() {
        set_max_reply(64);
        for id in [7u64, 70_000, u64::MAX >> 1, u64::MAX] {
            let big = ok_frame(id, |out| etf::put_binary(out, &[1; 100]));
            let limited = limit_reply(big.clone());
            let expected = tuple(vec![
                int(id),
                atom("error"),
                tuple(vec![atom("reply_too_large"), int(big.len() as u64), int(64)]),
            ]);
            assert_eq!(Term::decode(&limited[..]).unwrap(), expected, "id {id}");
            let small = ok_frame(id, |out| etf::put_atom(out, "ok"));
            assert_eq!(limit_reply(small.clone()), small);
        }
        set_max_reply(usize::MAX);
    }

    #[test]
    fn ok_frame_is_valid_etf() {
        let frame = ok_frame(1 << 40, |out| etf::put_atom(out, "undefined"));
        let term = Term::decode(&frame[..]).expect("decodes");
        let expected = tuple(vec![int(1 << 40), atom("ok"), binary(&[131, 119, 9, b'u', b'n', b'd', b'e', b'f', b'i', b'n', b'e', b'd'])]);
        assert_eq!(term, expected);
    }
}
