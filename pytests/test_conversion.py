"""The type conversion table of docs/PROTOCOL.md, row by row, through eval."""

import math

import erlang as etf
import pytest

from conftest import A, Atom, ImproperList, Opaque, Raw, describe_error, export_fun, pid, port_term, ref, t2b

# --- Erlang -> Python -----------------------------------------------------------------------------

TO_PYTHON = [
    ("small_int", 42, "int", "42"),
    ("negative_int", -7, "int", "-7"),
    ("int32_edge", -(2**31), "int", str(-(2**31))),
    ("bignum", 2**64, "int", str(2**64)),
    ("negative_bignum", -(2**100), "int", str(-(2**100))),
    ("huge_bignum", 2**2400 + 1, "int", str(2**2400 + 1)),
    ("float", 1.5, "float", "1.5"),
    ("negative_float", -0.25, "float", "-0.25"),
    ("true", True, "bool", "True"),
    ("false", False, "bool", "False"),
    ("undefined", None, "NoneType", "None"),
    ("nil", A("nil"), "NoneType", "None"),
    ("none", A("none"), "NoneType", "None"),
    ("atom", A("hello"), "str", "'hello'"),
    ("unicode_atom", A("héllo_ж"), "str", "'héllo_ж'"),
    ("utf8_binary", "héllo", "str", "'héllo'"),
    ("empty_binary", b"", "str", "''"),
    ("non_utf8_binary", b"\xff\x00", "bytes", "b'\\xff\\x00'"),
    ("pyport_bytes", (A("$pyport_bytes"), b"abc"), "bytes", "b'abc'"),
    ("list", [1, A("a"), "b"], "list", "[1, 'a', 'b']"),
    ("string_ext_list", Raw(b"k\x00\x02hi"), "list", "[104, 105]"),
    ("empty_list", [], "list", "[]"),
    ("tuple", (1, 2.5, "x"), "tuple", "(1, 2.5, 'x')"),
    ("empty_tuple", (), "tuple", "()"),
    ("map", {"k": 1, 2: [3]}, "dict", "{'k': 1, 2: [3]}"),
    ("atom_key_map", {A("a"): 1}, "dict", "{'a': 1}"),
    ("empty_map", {}, "dict", "{}"),
]


@pytest.mark.parametrize("name,term,typ,rep", TO_PYTHON, ids=[r[0] for r in TO_PYTHON])
def test_erlang_to_python(port, name, term, typ, rep):
    assert port.eval_ok("[type(v).__name__, repr(v)]", v=term) == [typ.encode(), rep.encode()]


OPAQUE = [("pid", pid(5)), ("ref", ref(3)), ("port", port_term(2)), ("fun", export_fun())]


@pytest.mark.parametrize("name,term", OPAQUE, ids=[o[0] for o in OPAQUE])
def test_opaque_terms(port, name, term):
    assert port.eval_ok("type(v).__name__", v=term) == b"OpaqueTerm"
    assert port.eval_ok("type(v) is __import__('erlang').OpaqueTerm", v=term) is True
    # Back to Erlang as the identical term, also nested and after a pickle round trip.
    assert port.eval_ok("v", v=term) == Opaque(term)
    back = port.eval_ok("[v, {'k': v}, (v,)]", v=term)
    assert back == [Opaque(term), {b"k": Opaque(term)}, (Opaque(term),)]
    assert port.eval_ok("__import__('pickle').loads(__import__('pickle').dumps(v))", v=term) == Opaque(term)
    # Hashable, equal to a pickled copy, distinct from another term of the same kind.
    code = (
        "(lambda pickle, c: [hash(v) == hash(c), v == c, {v: 1}[c], v == w, v == 5])"
        "(__import__('pickle'), __import__('pickle').loads(__import__('pickle').dumps(v)))"
    )
    other = {"pid": pid(6), "ref": ref(4), "port": port_term(3), "fun": export_fun("lists", "foldl", 3)}[name]
    assert port.eval_ok(code, v=term, w=other) == [True, True, 1, False, False]


# --- Python -> Erlang -----------------------------------------------------------------------------

TO_ERLANG = [
    ("int", "42", 42),
    ("negative", "-1", -1),
    ("bignum", "2**100", 2**100),
    ("negative_bignum", "-(2**300)", -(2**300)),
    ("float", "0.1", 0.1),
    ("nan", "float('nan')", A("nan")),
    ("infinity", "float('inf')", A("infinity")),
    ("neg_infinity", "-float('inf')", A("neg_infinity")),
    ("true", "True", True),
    ("false", "False", False),
    ("none", "None", None),
    ("str", "'héllo €'", "héllo €".encode()),
    ("empty_str", "''", b""),
    ("bytes", "b'\\xff\\x00'", b"\xff\x00"),
    ("bytearray", "bytearray(b'ab')", b"ab"),
    ("list", "[1, 'a', None]", [1, b"a", None]),
    ("small_int_list", "[-1, 2]", [-1, 2]),
    ("byte_valued_list", "[200, 255, 0]", [200, 255, 0]),
    ("long_byte_list", "list(range(256)) * 300", list(range(256)) * 300),
    ("ones_list_70000", "[1] * 70000", [1] * 70000),
    ("tuple", "(1, 'a')", (1, b"a")),
    ("empty", "[[], (), {}]", [[], (), {}]),
    ("dict", "{'a': 1, 2: [3], (1, 2): 'x'}", {b"a": 1, 2: [3], (1, 2): b"x"}),
    ("frozenset", "frozenset([5])", [5]),
    ("complex", "1j", (A("python_object"), b"complex", b"1j")),
    ("range", "range(3)", (A("python_object"), b"range", b"range(0, 3)")),
]


@pytest.mark.parametrize("name,code,expected", TO_ERLANG, ids=[r[0] for r in TO_ERLANG])
def test_python_to_erlang(port, name, code, expected):
    got = port.eval_ok(code)
    assert got == expected
    if isinstance(expected, Atom):
        assert isinstance(got, Atom)


def type_name_ok(got, qualname):
    """TypeName is the class name, module-qualified outside builtins (both accepted)."""
    return got == qualname.encode() or got == qualname.rsplit(".", 1)[-1].encode()


def test_python_object_fraction(port):
    got = port.eval_ok("__import__('fractions').Fraction(1, 2)")
    assert got[0] == "python_object" and isinstance(got[0], Atom), got
    assert type_name_ok(got[1], "fractions.Fraction") and got[2] == b"Fraction(1, 2)", got


def test_decimal_has_a_tagged_form(port):
    got = port.eval_ok("__import__('decimal').Decimal('1.5')")
    assert got == (Atom("$pyport_decimal"), b"1.5"), got


def test_set_becomes_list(port):
    assert sorted(port.eval_ok("{3, 1, 2}")) == [1, 2, 3]


def test_python_object_tagged(port):
    got = port.eval_ok("object()")
    assert isinstance(got, tuple) and len(got) == 3, got
    assert got[0] == "python_object" and isinstance(got[0], Atom)
    assert got[1] == b"object" and got[2].startswith(b"<object object at 0x")
    port.exec_ok("class Thing:\n    def __repr__(self):\n        return 'Thing!'\n")
    [got] = port.eval_ok("[Thing()]")
    assert got[0] == "python_object" and type_name_ok(got[1], "__main__.Thing") and got[2] == b"Thing!", got


def test_repr_raising_does_not_crash(port):
    port.exec_ok("class Bad:\n    def __repr__(self):\n        raise ValueError('no repr')\n")
    got = port.eval_ok("Bad()")
    assert isinstance(got, tuple) and len(got) == 3 and got[0] == "python_object", got
    assert got[1] == b"__main__.Bad" and isinstance(got[2], bytes), got
    port.assert_serving()


def test_colliding_result_keys(port):
    r = port.eval_err("{'a': 1, b'a': 2}")
    assert r[0] == "duplicate_key", describe_error(r)
    port.assert_serving()


def test_unencodable_str_does_not_crash(port):
    # A lone surrogate has no UTF-8 encoding: Python's own error, the port lives on.
    r = port.eval_err("'\\ud800'")
    assert r[0] == "python" and r[1] == "UnicodeEncodeError" and isinstance(r[1], Atom), r
    port.assert_serving()


# --- round trips and limits ---------------------------------------------------------------------


def test_round_trip_mixed(port):
    term = {
        "ints": [0, 1, -1, 255, 256, 2**31 - 1, -(2**31), 2**63, -(2**63)],
        "floats": [0.0, -1.5, 1e300],
        "nested": [(1, [2, {"x": (3,)}])],
        "bin": b"\x00\x01\xfe",
        "bools": [True, False, None],
    }
    got = port.eval_ok("v", v=term)
    assert got == {
        b"ints": term["ints"],
        b"floats": term["floats"],
        b"nested": [(1, [2, {b"x": (3,)}])],
        b"bin": b"\x00\x01\xfe",
        b"bools": [True, False, None],
    }


def test_round_trip_100kb_map(port):
    term = {"key%05d" % i: ["v" * 10, i, i / 2] for i in range(2500)}
    got = port.eval_ok("v", v=term)
    assert got == {k.encode(): [b"v" * 10, i, i / 2] for i, k in enumerate(term)}


def test_unsupported_terms(port):
    for term in (ImproperList([1, 2]), etf.OtpErlangBinary(b"\xff", bits=3), [1, ImproperList([A("a"), 3])]):
        r = port.err(port.call("builtins", "repr", [term]))
        assert isinstance(r, tuple) and r[0] == "unsupported_term", r
        assert isinstance(r[1], bytes)
    port.assert_serving()


def test_compressed_payload_is_unsupported(port):
    payload = etf.term_to_binary(([etf.OtpErlangBinary(b"a" * 1000)], {}), compressed=True)
    rid = port.new_id()
    port.send((A("call"), rid, port.owner, "builtins", "len", payload))
    r = port.err(rid)
    assert isinstance(r, tuple) and r[0] == "unsupported_term", r
    port.assert_serving()


def nested(depth):
    v = []
    for _ in range(depth):
        v = [v]
    return v


def depth_of(v):
    d = 0
    while v:
        assert isinstance(v, list) and len(v) == 1
        v = v[0]
        d += 1
    return d


def test_nesting_within_limit(port):
    assert depth_of(port.eval_ok("v", v=nested(900))) == 900
    port.exec_ok("x = []\nfor _ in range(900):\n    x = [x]\n")
    assert depth_of(port.eval_ok("x")) == 900


def test_nesting_too_deep_both_ways(port):
    assert port.err(port.eval("1", {"v": nested(1100)})) == (A("nesting_too_deep"), 1000)
    port.exec_ok("x = []\nfor _ in range(1100):\n    x = [x]\n")
    assert port.eval_err("x") == (A("nesting_too_deep"), 1000)
    port.exec_ok("d = {}\nfor _ in range(5000):\n    d = {'k': (d,)}\n")
    assert port.eval_err("d") == (A("nesting_too_deep"), 1000)
    port.assert_serving()


def test_nesting_limit_same_both_ways(port):
    """One limit both ways. A value of 1001 nested lists is over the limit coming back from
    Python, so it must be refused going in as well (as a Locals value it is 1002 containers deep
    counting the map, 1001 not counting it: over 1000 either way); a value that goes in must come
    back out."""
    port.exec_ok("x = []\nfor _ in range(1000):\n    x = [x]\n")  # 1001 lists
    assert port.eval_err("x") == (A("nesting_too_deep"), 1000)
    assert port.err(port.eval("1", {"v": nested(1000)})) == (A("nesting_too_deep"), 1000)
    assert port.err(port.call("builtins", "len", [nested(1000)])) == (A("nesting_too_deep"), 1000)
    for depth in (998, 999):
        status, _ = port.result(port.eval("1", {"v": nested(depth)}))
        if status == "ok":
            assert depth_of(port.eval_ok("v", v=nested(depth))) == depth
    port.assert_serving()


def test_self_referencing_result(port):
    port.exec_ok("l = []\nl.append(l)\nd = {}\nd['d'] = d\n")
    assert port.eval_err("l") == (A("nesting_too_deep"), 1000)
    assert port.eval_err("d") == (A("nesting_too_deep"), 1000)
    port.assert_serving()


def test_latin1_atom_in_payload(port):
    """ATOM_EXT / SMALL_ATOM_EXT (Latin-1, what OTP 25's default term_to_binary writes): decoded as
    the right str, or rejected as bad_term; never mojibake, never a crash."""
    for raw in (b"d\x00\x04caf\xe9", b"s\x04caf\xe9"):
        rid = port.eval("[type(v).__name__, v]", {"v": Raw(raw)})
        status, x = port.result(rid)
        if status == "ok":
            assert x == [b"str", "café".encode()], x
        else:
            assert x[0] == "bad_term", x
    port.assert_serving()
