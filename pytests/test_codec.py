"""The harness's own term helpers, checked against erlang-py and (when `erl` is installed) against
real `term_to_binary` output: if these are wrong, every other test is meaningless.
No pyport binary needed."""

import shutil
import struct
import subprocess

import erlang as etf
import pytest

from conftest import (
    A,
    Atom,
    ImproperList,
    Opaque,
    Raw,
    b2t,
    deep_list_bytes,
    export_fun,
    frame,
    pid,
    port_term,
    ref,
    t2b,
)


def test_binaries_and_atoms():
    assert t2b("abc") == b"\x83m\x00\x00\x00\x03abc"
    assert t2b(b"\xff") == b"\x83m\x00\x00\x00\x01\xff"
    assert t2b(A("ok")) == b"\x83w\x02ok"
    assert t2b(None) == b"\x83w\x09undefined"
    assert b2t(t2b(A("ok"))) == "ok" and isinstance(b2t(t2b(A("ok"))), Atom)
    assert b2t(t2b("abc")) == b"abc"


def test_round_trip_structures():
    term = {
        "k": [1, -1, 2**70, -(2**70), 1.5, True, False, None],
        A("a"): (A("x"), b"\x00\xff", []),
        7: {},
    }
    back = b2t(t2b(term))
    assert back == {
        b"k": [1, -1, 2**70, -(2**70), 1.5, True, False, None],
        A("a"): (A("x"), b"\x00\xff", []),
        7: {},
    }


def test_string_ext_decodes_as_list():
    assert b2t(b"\x83k\x00\x03\x01\x02\x03") == [1, 2, 3]


def test_improper_list():
    data = t2b(ImproperList([1, 2, 3]))
    assert data == b"\x83l\x00\x00\x00\x02a\x01a\x02a\x03"
    assert b2t(data) == ImproperList([1, 2, 3])


def test_opaque_terms_round_trip():
    for term in (pid(5), ref(3), port_term(2), export_fun()):
        back = b2t(t2b(term))
        assert isinstance(back, Opaque)
        assert back == Opaque(term)
        assert b2t(t2b(back)) == back
    assert Opaque(pid(1)) != Opaque(pid(2))
    # A pid whose node atom is encoded as a Latin-1 ATOM_EXT is the same pid.
    latin = b"\x83XA\x00\x0dnonode@nohost" + struct.pack(">III", 5, 0, 1)
    latin = latin.replace(b"XA", b"Xd")
    assert b2t(latin) == Opaque(pid(5))


def test_raw_embeds_bytes_verbatim():
    assert t2b((A("t"), Raw(b"w\x02\xff\xfe"))) == b"\x83h\x02w\x01tw\x02\xff\xfe"


def test_frame_and_deep_list():
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert b2t(b"\x83" + deep_list_bytes(3)) == [[[[]]]]


ERL_CHECK = r"""
T = {call, 5, <<"math">>, <<"sqrt">>,
     term_to_binary({[16, -1, 1.5, <<"x">>, foo, undefined], #{<<"k">> => [1,2,3]}}, [{minor_version, 2}])},
io:put_chars(binary:encode_hex(term_to_binary(T, [{minor_version, 2}]))),
halt().
"""


def test_matches_real_term_to_binary():
    # Not a skip: `make test` needs Erlang anyway, and a skipped cross-check looks like a pass.
    if shutil.which("erl") is None:
        pytest.fail("erl is not installed (run `make bootstrap`): cannot cross-check the codec")
    out = subprocess.run(
        ["erl", "-noshell", "-eval", ERL_CHECK], capture_output=True, timeout=60, check=True
    ).stdout
    real = bytes.fromhex(out.decode().strip())
    got = b2t(real)
    assert got[:4] == (A("call"), 5, b"math", b"sqrt")
    assert b2t(got[4]) == ([16, -1, 1.5, b"x", A("foo"), None], {b"k": [1, 2, 3]})
    # What we send for the same request decodes to the same thing with Erlang's own decoder.
    mine = t2b(
        (A("call"), 5, "math", "sqrt", t2b(([16, -1, 1.5, "x", A("foo"), None], {"k": [1, 2, 3]})))
    )
    check = (
        "B = binary:decode_hex(<<\"%s\">>), R = binary:decode_hex(<<\"%s\">>),"
        "{call,5,M,F,P} = binary_to_term(B), {call,5,M,F,P2} = binary_to_term(R),"
        "true = (binary_to_term(P) =:= binary_to_term(P2)), io:put_chars(<<\"same\">>), halt()."
        % (mine.hex(), real.hex())
    )
    out = subprocess.run(["erl", "-noshell", "-eval", check], capture_output=True, timeout=60)
    assert out.stdout == b"same", out
