"""Untrusted bytes: every malformed frame gets an error reply (never a panic, abort or hang), and
the port keeps serving afterwards (checked with a call whose reply must be the next frame)."""

import struct

import erlang as etf
import pytest

from conftest import A, Atom, Raw, deep_list_bytes, pid, t2b

REJECT_REASONS = {"bad_term", "bad_request"}


def expect_rejected(port, rid=None, reasons=REJECT_REASONS):
    """The next reply must be {undefined, error, _} or (when the Id is readable) {Id, error,
    {Reason, Detail}} with Reason in `reasons`."""
    t = port.recv()
    assert isinstance(t, tuple) and len(t) == 3, t
    if t[0] is None:
        assert t[1] == "error", t
        return t[2]
    assert t[0] == rid, "reply for an unexpected Id: %r" % (t,)
    assert t[1] == "error", t
    reason = t[2]
    assert isinstance(reason, tuple) and len(reason) == 2 and reason[0] in reasons, reason
    assert isinstance(reason[0], Atom)
    return reason


# --- whole frames that are not a decodable envelope -----------------------------------------

OWNER = t2b(pid(1))[1:]  # encoded pid without version byte


def call_env(rid, payload_etf):
    """{call, Id, Owner, <<"builtins">>, <<"repr">>, Payload} with raw payload bytes."""
    return t2b((A("call"), rid, pid(1), "builtins", "repr", payload_etf))


ENVELOPES = {
    "garbage": b"hello, this is not ETF",
    "empty": b"",
    "version_only": b"\x83",
    "wrong_version": b"\x82h\x02w\x02okw\x02ok",
    "tag_68": b"\x83D\x00",
    "tag_82": b"\x83R\x00",
    "tag_68_in_tuple": b"\x83h\x03w\x04calla\x01D\x00",
    "tag_82_in_tuple": b"\x83h\x03w\x04calla\x01R\x00",
    "list_count_ffffffff": b"\x83l\xff\xff\xff\xff",
    "tuple_count_ffffffff": b"\x83i\xff\xff\xff\xff",
    "map_count_ffffffff": b"\x83t\xff\xff\xff\xff",
    "binary_len_ffffffff": b"\x83m\xff\xff\xff\xffabc",
    "bignum_len_ffffffff": b"\x83o\xff\xff\xff\xff\x00\x01",
    "string_len_ffff": b"\x83k\xff\xffab",
    "atom_len_truncated": b"\x83w\xffab",
    "nesting_100000_lists": b"\x83" + deep_list_bytes(100_000),
    "nesting_100000_tuples": b"\x83" + b"h\x01" * 100_000 + b"j",
    "nesting_100000_maps": b"\x83" + b"t\x00\x00\x00\x01a\x01" * 100_000 + b"j",
    "truncated_call": t2b((A("call"), 77, pid(1), "builtins", "repr", t2b(([1], {}))))[:-7],
    "invalid_utf8_atom": b"\x83w\x02\xff\xfe",
    "invalid_utf8_atom_in_tuple": b"\x83h\x02w\x05stats" + b"w\x02\xc3\x28",
    "compressed_envelope": b"\x83P\x00\x00\x00\x10x\x9c\xcb\x00\x00\x00\x6a\x00\x6b",
    "atom_not_tuple": t2b(A("hello")),
    "integer": t2b(12345),
    "empty_tuple": t2b(()),
}


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_bad_envelope(port, name):
    port.send_body(ENVELOPES[name])
    expect_rejected(port, rid=77 if name == "truncated_call" else None)
    port.assert_serving()


def test_trailing_bytes(port):
    """Erlang's own binary_to_term ignores bytes after the term; the port may accept or reject
    them, but must answer exactly once and keep serving."""
    rid = port.new_id()
    port.send_body(t2b((A("stats"), rid)) + b"\x00\x01")
    t = port.recv()
    assert t[0] in (rid, None), t
    if t[1] == "error":
        expect_reason = t[2]
        assert t[0] is None or expect_reason[0] in REJECT_REASONS, t
    port.assert_serving()
    rid = port.new_id()
    port.send((A("call"), rid, port.owner, "builtins", "repr", t2b(([1], {})) + b"\x00"))
    status, x = port.result(rid)
    assert status == "ok" and x == b"1" or status == "error" and x[0] == "bad_term", (status, x)
    port.assert_serving()


# --- envelopes with a readable Id but the wrong shape -> {Id, error, {bad_request, _}} --------

SHAPES = {
    "unknown_op": lambda rid: (A("frobnicate"), rid),
    "call_missing_fields": lambda rid: (A("call"), rid),
    "call_owner_not_pid": lambda rid: (A("call"), rid, A("nopid"), "m", "f", t2b(([], {}))),
    "call_module_not_binary": lambda rid: (A("call"), rid, pid(1), 42, "f", t2b(([], {}))),
    "call_payload_not_binary": lambda rid: (A("call"), rid, pid(1), "builtins", "len", [1]),
    "eval_code_not_binary": lambda rid: (A("eval"), rid, pid(1), [1, 2], t2b({})),
    "exec_too_many_fields": lambda rid: (A("exec"), rid, pid(1), "x=1", t2b({}), 5, 6),
    "exec_chain_not_an_id": lambda rid: (A("exec"), rid, pid(1), "x=1", t2b({}), A("chain")),
    "call_chain_negative": lambda rid: (A("call"), rid, pid(1), "builtins", "len", t2b(([[]], {})), -1),
    "stats_extra_field": lambda rid: (A("stats"), rid, 1),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_bad_shape(port, name):
    rid = port.new_id()
    port.send(SHAPES[name](rid))
    expect_rejected(port, rid)
    port.assert_serving()


@pytest.mark.parametrize("rid", [0, -5, 2**63, 2**70, 1.5])
def test_bad_request_ids(port, rid):
    port.send((A("eval"), rid, pid(1), "1", t2b({})))
    t = port.recv()
    assert t[1] == "error", t
    assert t[0] is None or t[0] == rid, t
    port.assert_serving()


# --- a good envelope carrying a bad payload -> {Id, error, {bad_term, _}} ---------------------

BIG_LIST = b"\x83l\xff\xff\xff\xff"
PAYLOADS = {
    "garbage": b"not etf at all",
    "empty": b"",
    "version_only": b"\x83",
    "tag_68": b"\x83D\x00",
    "tag_82": b"\x83R\x00",
    "tag_68_in_args": b"\x83h\x02l\x00\x00\x00\x01D\x00jt\x00\x00\x00\x00",
    "tag_82_in_args": b"\x83h\x02l\x00\x00\x00\x01R\x00jt\x00\x00\x00\x00",
    "list_count_ffffffff": BIG_LIST,
    "list_count_ffffffff_in_args": b"\x83h\x02l\xff\xff\xff\xff",
    "map_count_ffffffff": b"\x83h\x02jt\xff\xff\xff\xff",
    "binary_len_ffffffff": b"\x83h\x02l\x00\x00\x00\x01m\xff\xff\xff\xffjt\x00\x00\x00\x00",
    "bignum_len_ffffffff": b"\x83h\x02l\x00\x00\x00\x01o\xff\xff\xff\xff\x00\x01jt\x00\x00\x00\x00",
    "truncated": t2b(([1, 2, "three", {"k": 1.5}], {}))[:-6],
    "invalid_utf8_atom": b"\x83h\x02l\x00\x00\x00\x01w\x02\xff\xfejt\x00\x00\x00\x00",
    "invalid_utf8_long_atom": b"\x83h\x02l\x00\x00\x00\x01v\x00\x02\xc3\x28jt\x00\x00\x00\x00",
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_bad_call_payload(port, name):
    rid = port.new_id()
    port.send((A("call"), rid, port.owner, "builtins", "repr", PAYLOADS[name]))
    expect_rejected(port, rid, {"bad_term"})
    port.assert_serving()


@pytest.mark.parametrize("name", ["garbage", "tag_68", "tag_82", "list_count_ffffffff", "truncated"])
def test_bad_eval_locals(port, name):
    bad = {
        "garbage": b"\x83zzz",
        "tag_68": b"\x83t\x00\x00\x00\x01m\x00\x00\x00\x01xD\x00",
        "tag_82": b"\x83t\x00\x00\x00\x01m\x00\x00\x00\x01xR\x00",
        "list_count_ffffffff": b"\x83t\x00\x00\x00\x01m\x00\x00\x00\x01xl\xff\xff\xff\xff",
        "truncated": t2b({"x": [1, 2, 3]})[:-3],
    }[name]
    rid = port.new_id()
    port.send((A("eval"), rid, port.owner, "1", bad))
    expect_rejected(port, rid, {"bad_term"})
    port.assert_serving()


def test_payload_not_args_kwargs_tuple(port):
    for payload in (t2b(42), t2b(([1],)), t2b(({}, []))):
        rid = port.new_id()
        port.send((A("call"), rid, port.owner, "builtins", "repr", payload))
        expect_rejected(port, rid, {"bad_term", "bad_request"})
    port.assert_serving()


def test_payload_nesting_100000(port):
    rid = port.new_id()
    payload = b"\x83h\x02l\x00\x00\x00\x01" + deep_list_bytes(100_000) + b"jt\x00\x00\x00\x00"
    port.send((A("call"), rid, port.owner, "builtins", "repr", payload))
    assert port.err(rid) == (A("nesting_too_deep"), 1000)
    port.assert_serving()


def test_duplicate_map_keys_in_payload(port):
    """A map holding the same key twice is not valid ETF (Erlang's binary_to_term rejects it)."""
    m = b"t\x00\x00\x00\x02" + b"m\x00\x00\x00\x01ka\x01" + b"m\x00\x00\x00\x01ka\x02"
    rid = port.new_id()
    port.send((A("call"), rid, port.owner, "builtins", "repr", b"\x83h\x02l\x00\x00\x00\x01" + m + b"jt\x00\x00\x00\x00"))
    reason = port.err(rid)
    assert isinstance(reason, tuple) and reason[0] in ("bad_term", "duplicate_key"), reason
    rid = port.new_id()
    port.send((A("eval"), rid, port.owner, "k", b"\x83" + m))
    reason = port.err(rid)
    assert isinstance(reason, tuple) and reason[0] in ("bad_term", "duplicate_key"), reason
    port.assert_serving()


def test_colliding_map_keys_after_conversion(port):
    """Atom `a` and binary <<"a">> are both Python 'a': an error, never a silent drop."""
    # Built from erlang-py objects: Atom("a") == "a" in Python, so a plain dict would merge them.
    rid = port.call("builtins", "repr", [{etf.OtpErlangAtom("a"): 1, etf.OtpErlangBinary(b"a"): 2}])
    reason = port.err(rid)
    assert isinstance(reason, tuple) and reason[0] == "duplicate_key", reason
    assert isinstance(reason[1], bytes)
    port.assert_serving()


def test_colliding_kwargs_and_locals(port):
    both = {etf.OtpErlangAtom("x"): 1, etf.OtpErlangBinary(b"x"): 2}
    rid = port.call("builtins", "dict", [], both)
    reason = port.err(rid)
    assert isinstance(reason, tuple) and reason[0] in ("duplicate_key", "bad_request"), reason
    rid = port.eval("x", both)
    reason = port.err(rid)
    assert isinstance(reason, tuple) and reason[0] in ("duplicate_key", "bad_request"), reason
    port.assert_serving()


def test_bad_frames_back_to_back(port):
    """Many bad frames in one write, then a good one: one rejection each, then the answer."""
    bodies = [ENVELOPES[n] for n in ("garbage", "tag_68", "tag_82", "list_count_ffffffff", "invalid_utf8_atom")]
    port.send_raw(b"".join(struct.pack(">I", len(b)) + b for b in bodies))
    for _ in bodies:
        expect_rejected(port)
    port.assert_serving()
