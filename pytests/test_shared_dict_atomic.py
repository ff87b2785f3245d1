"""SharedDict's atomic operations on the Python side (`sd.incr`, `sd.compare_and_swap`,
`erlang.ABSENT`), run inside the port, and the exact Python types of values stored from Python
(which the Erlang-side read cache and decoding must never change)."""

import textwrap

from conftest import A, describe_error

PRELUDE = textwrap.dedent(
    """
    import math, threading
    import erlang
    from erlang import SharedDict

    def raises(exc, fn, *a, **kw):
        try:
            fn(*a, **kw)
        except exc as e:
            return e
        except BaseException as e:
            raise AssertionError('%r raised %r, expected %s' % (fn, e, exc.__name__))
        raise AssertionError('%r did not raise %s' % (fn, exc.__name__))

    def same(a, b):
        # Same type and equal: what compare_and_swap calls equal.
        return type(a) is type(b) and a == b

    def run_threads(n, target):
        # Starts n threads together, joins them, returns what they raised.
        errors = []
        start = threading.Barrier(n)
        def worker(t):
            try:
                start.wait()
                target(t)
            except BaseException as e:
                errors.append('thread %d: %r' % (t, e))
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return errors
    """
)


def py(port, code, timeout=15.0, **locals):
    """Run `code` (dedented) in the port after the prelude; fail with the Python traceback."""
    port.exec_ok(PRELUDE)
    return port.exec_ok(textwrap.dedent(code), timeout=timeout, **locals)


def found(port, h, key):
    status, v = port.sd_get(h, key)
    assert status == "ok", describe_error(v)
    return v


# --- incr ---------------------------------------------------------------------------------------


def test_incr_counts_from_zero_and_returns_the_new_value(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        assert sd.incr('c') == 1
        assert sd.incr('c', 5) == 6
        assert sd.incr('c', n=-10) == -4
        v = sd['c']
        assert type(v) is int and v == -4, repr(v)
        r = sd.incr('zero', 0)
        assert type(r) is int and r == 0, repr(r)
        assert 'zero' in sd and sd['zero'] == 0
        """,
        h=sd_handle,
    )
    # Erlang reads the counter
    assert found(port, sd_handle, "c") == (A("found"), -4)
    # and Python counts onto an integer Erlang stored
    assert port.sd_set(sd_handle, "e", 40) == ("ok", A("ok"))
    py(port, "assert SharedDict(h).incr('e', 2) == 42", h=sd_handle)
    assert found(port, sd_handle, "e") == (A("found"), 42)


def test_incr_big_integers(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        assert sd.incr('b', 2 ** 100) == 2 ** 100
        assert sd.incr('b', 2 ** 100) == 2 ** 101
        assert sd.incr('b', -(2 ** 101) - 1) == -1
        sd['edge'] = 2 ** 63 - 1
        assert sd.incr('edge') == 2 ** 63
        assert sd.incr('edge', 2 ** 63) == 2 ** 64
        sd['nedge'] = -(2 ** 63)
        assert sd.incr('nedge', -1) == -(2 ** 63) - 1
        """,
        h=sd_handle,
    )
    assert found(port, sd_handle, "edge") == (A("found"), 2**64)


def test_incr_non_int_value_raises_type_error(port, sd_handle):
    # Stored from Erlang: the atom true arrives as Python True, a bool, which incr refuses too.
    assert port.sd_set(sd_handle, "erl_true", True) == ("ok", A("ok"))
    py(
        port,
        """
        sd = SharedDict(h)
        values = {'true': True, 'false': False, 'float': 1.0, 'str': '1', 'bytes': b'1',
                  'none': None, 'list': [1], 'dict': {'a': 1}}
        for k, v in values.items():
            sd[k] = v
        for k, v in values.items():
            raises(TypeError, sd.incr, k)
            assert same(sd[k], v), (k, sd[k])
        raises(TypeError, sd.incr, 'erl_true')
        assert sd['erl_true'] is True
        """,
        h=sd_handle,
    )


def test_atomic_ops_on_destroyed_dict_raise_destroyed(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        sd['k'] = 1
        sd.destroy()
        raises(erlang.SharedDictDestroyed, sd.incr, 'k')
        raises(erlang.SharedDictDestroyed, sd.compare_and_swap, 'k', 1, 2)
        raises(erlang.SharedDictDestroyed, sd.compare_and_swap, 'k', erlang.ABSENT, 2)
        """,
        h=sd_handle,
    )


# --- compare_and_swap ---------------------------------------------------------------------------


def test_compare_and_swap_same_type_and_equal(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        sd['k'] = 1
        r = sd.compare_and_swap('k', 1.0, 2)
        assert r is False, repr(r)
        assert sd.compare_and_swap('k', True, 2) is False
        assert same(sd['k'], 1)
        r = sd.compare_and_swap('k', 1, 2)
        assert r is True, repr(r)
        assert same(sd['k'], 2)
        # a stale old value: nothing stored
        assert sd.compare_and_swap('k', 1, 3) is False
        assert same(sd['k'], 2)

        sd['b'] = True
        assert sd.compare_and_swap('b', 1, 'x') is False
        assert sd.compare_and_swap('b', True, 'x') is True
        assert same(sd['b'], 'x')
        assert sd.compare_and_swap('b', b'x', 'y') is False
        assert sd.compare_and_swap('b', 'x', 'y') is True

        sd['f'] = 1.5
        assert sd.compare_and_swap('f', 1.5, [1, 2]) is True
        assert sd.compare_and_swap('f', (1, 2), 0) is False
        assert sd.compare_and_swap('f', [1, 2], {'a': 1}) is True
        assert sd.compare_and_swap('f', {'a': 1}, None) is True
        assert sd.compare_and_swap('f', None, 'end') is True
        assert same(sd['f'], 'end')
        """,
        h=sd_handle,
    )


def test_compare_and_swap_absent(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        assert sd.compare_and_swap('k', erlang.ABSENT, 1) is True
        assert same(sd['k'], 1)
        assert sd.compare_and_swap('k', erlang.ABSENT, 2) is False
        assert same(sd['k'], 1)
        # a key holding None is present
        sd['n'] = None
        assert sd.compare_and_swap('n', erlang.ABSENT, 2) is False
        assert sd['n'] is None
        del sd['k']
        assert sd.compare_and_swap('k', erlang.ABSENT, 3) is True
        assert same(sd['k'], 3)
        """,
        h=sd_handle,
    )


# --- threads ------------------------------------------------------------------------------------


def test_threads_incr_exact(port, sd_handle):
    """8 threads x 10,000 sd.incr on one key: not one increment is lost."""
    py(
        port,
        """
        sd = SharedDict(h)
        def work(t):
            last = 0
            for _ in range(10000):
                v = sd.incr('c')
                assert v > last, (last, v)
                last = v
        errors = run_threads(8, work)
        assert not errors, errors[:5]
        assert same(sd['c'], 80000), sd['c']
        """,
        timeout=120.0,
        h=sd_handle,
    )
    assert found(port, sd_handle, "c") == (A("found"), 80000)


def test_threads_compare_and_swap_retry_exact(port, sd_handle):
    """4 threads each add 1 2,000 times with a read / compare_and_swap retry loop."""
    py(
        port,
        """
        sd = SharedDict(h)
        sd['c'] = 0
        def work(t):
            done = 0
            while done < 2000:
                cur = sd['c']
                if sd.compare_and_swap('c', cur, cur + 1):
                    done += 1
        errors = run_threads(4, work)
        assert not errors, errors[:5]
        assert same(sd['c'], 8000), sd['c']
        """,
        timeout=120.0,
        h=sd_handle,
    )


# --- exact types of Python values ---------------------------------------------------------------


def test_python_values_keep_their_exact_types(port, sd_handle, tmp_path):
    """Values stored from Python read back in Python with their exact types and values, also
    after Erlang has read them (and so cached or decoded them on its side)."""
    (tmp_path / "sd_atomic_types.py").write_text(
        textwrap.dedent(
            """
            import collections, enum

            class Color(enum.StrEnum):
                RED = 'red'

            Point = collections.namedtuple('Point', 'x y')
            """
        )
    )
    py(
        port,
        """
        import sys
        if d not in sys.path:
            sys.path.insert(0, d)
        from sd_atomic_types import Color, Point
        sd = SharedDict(h)
        sd['bytes'] = b'\\xff\\x00'
        sd['str'] = 'text'
        sd['set'] = {1, 2}
        sd['frozenset'] = frozenset({'a', 'b'})
        sd['nan'] = float('nan')
        sd['negzero'] = -0.0
        sd['order'] = {'z': 1, 'a': 2, 'm': 3}
        sd['enum'] = Color.RED
        sd['point'] = Point(1, 2)
        sd['tuple'] = (1, 'x')
        sd['bool'] = True
        sd['big'] = 2 ** 200
        """,
        h=sd_handle,
        d=str(tmp_path),
    )
    check = """
        from sd_atomic_types import Color, Point
        sd = SharedDict(h)
        assert same(sd['bytes'], b'\\xff\\x00'), repr(sd['bytes'])
        assert same(sd['str'], 'text'), repr(sd['str'])
        assert same(sd['set'], {1, 2}), repr(sd['set'])
        assert same(sd['frozenset'], frozenset({'a', 'b'})), repr(sd['frozenset'])
        v = sd['nan']
        assert type(v) is float and math.isnan(v), repr(v)
        v = sd['negzero']
        assert type(v) is float and v == 0.0 and math.copysign(1.0, v) == -1.0, repr(v)
        v = sd['order']
        assert type(v) is dict and list(v.items()) == [('z', 1), ('a', 2), ('m', 3)], repr(v)
        assert sd['enum'] is Color.RED, repr(sd['enum'])
        v = sd['point']
        assert type(v) is Point and v == Point(1, 2) and v.y == 2, repr(v)
        assert same(sd['tuple'], (1, 'x')), repr(sd['tuple'])
        assert sd['bool'] is True
        assert same(sd['big'], 2 ** 200)
        """
    py(port, check, h=sd_handle)
    # Erlang reads every one of them (twice: the second read may come from its cache) ...
    for key in ("bytes", "str", "set", "frozenset", "nan", "negzero", "order", "enum", "point",
                "tuple", "bool", "big"):
        for _ in range(2):
            found(port, sd_handle, key)
    # ... and Python still reads the same types and values.
    py(port, check, h=sd_handle)
