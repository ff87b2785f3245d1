"""SharedDict: the wire operations and the Python `erlang.SharedDict` class, inside the port."""

import textwrap
import time

import pytest

from conftest import A, Atom, Opaque, ImproperList, describe_error, is_handle, pid, wait_until

DESTROYED = "SharedDict has been destroyed"

PRELUDE = textwrap.dedent(
    """
    import collections.abc, pickle, threading
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
    """
)


def py(port, code, owner=None, **locals):
    """Run `code` (dedented) in the port after the prelude; fail with the Python traceback."""
    port.exec_ok(PRELUDE, owner=owner)
    return port.exec_ok(textwrap.dedent(code), owner=owner, **locals)


def found(port, h, key):
    status, v = port.sd_get(h, key)
    assert status == "ok", describe_error(v)
    return v


# --- handles ------------------------------------------------------------------------------------


def test_handle_shape_and_ids(port_factory):
    p = port_factory(["--generation", "3"])
    h1, h2 = p.sd_new(), p.sd_new()
    for h in (h1, h2):
        assert is_handle(h), h
        assert h[1] == 3
        assert len(h[3]) == 16
    assert h1[2] != h2[2] and h1[3] != h2[3]
    assert p.sd_destroy(h2) == ("ok", A("ok"))
    h3 = p.sd_new()
    assert h3[2] not in (h1[2], h2[2]), "dict id reused"
    assert p.stats()[A("dicts")] == 2


def test_python_sees_a_handle_object(port, sd_handle):
    py(
        port,
        """
        assert type(h) is erlang.SharedDictHandle, type(h)
        sd = SharedDict(h)
        sd2 = SharedDict(sd)
        sd['a'] = 1
        assert sd2['a'] == 1
        for bad in (42, 'x', b'x', None, [h], {}, ('$pyport_shared_dict', 0, 1, b'0' * 16), object()):
            e = raises(TypeError, SharedDict, bad)
            msg = str(e).lower()
            assert 'handle' in msg or 'shareddict' in msg, msg
        """,
        h=sd_handle,
    )


def test_handle_comes_back_identical(port, sd_handle):
    assert port.eval_ok("h", h=sd_handle) == sd_handle
    assert port.eval_ok("[h, {'k': (h,)}]", h=sd_handle) == [sd_handle, {b"k": (sd_handle,)}]
    assert port.eval_ok("__import__('pickle').loads(__import__('pickle').dumps(h))", h=sd_handle) == sd_handle
    # Stored in a dict (also its own) and read from Erlang.
    py(port, "SharedDict(h)['self'] = h", h=sd_handle)
    assert found(port, sd_handle, "self") == (A("found"), sd_handle)
    # A handle stored by Python in another process's namespace is still the same term.
    assert port.eval_ok("SharedDict(h)['self']") == sd_handle


# --- the Python class ---------------------------------------------------------------------------


def test_item_access(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        raises(KeyError, lambda: sd['missing'])
        sd['a'] = 1
        assert sd['a'] == 1
        sd['a'] = 2
        assert sd['a'] == 2
        assert 'a' in sd and 'b' not in sd
        del sd['a']
        assert 'a' not in sd
        raises(KeyError, sd.__delitem__, 'a')
        sd['n'] = None
        assert 'n' in sd
        assert sd.get('n', 'dflt') is None
        assert sd.get('missing') is None
        assert sd.get('missing', 'dflt') == 'dflt'
        assert sd.get('missing', default=5) == 5
        sd['cfg'] = {'host': 'localhost', 'port': 8080}
        assert sd['cfg'] == {'host': 'localhost', 'port': 8080}
        """,
        h=sd_handle,
    )


def test_mapping_protocol(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        for k in ['z', 'a', 'm']:
            sd[k] = k.upper()
        ks = sd.keys()
        assert type(ks) is list and ks == ['z', 'a', 'm'], ks
        assert all(type(k) is str for k in ks)
        assert len(sd) == 3
        assert list(sd) == ['z', 'a', 'm']
        assert list(sd.items()) == [('z', 'Z'), ('a', 'A'), ('m', 'M')]
        assert list(sd.values()) == ['Z', 'A', 'M']
        assert dict(sd) == {'z': 'Z', 'a': 'A', 'm': 'M'}
        assert sd.pop('z') == 'Z'
        raises(KeyError, sd.pop, 'z')
        assert sd.pop('z', 7) == 7
        assert sd.setdefault('a', 'x') == 'A'
        assert sd.setdefault('new', 'N') == 'N' and sd['new'] == 'N'
        assert sd.setdefault('none') is None and 'none' in sd
        sd.update({'u1': 1}, u2=2)
        sd.update([('u3', 3)])
        assert (sd['u1'], sd['u2'], sd['u3']) == (1, 2, 3)
        assert len(sd) == 7
        sd.clear()
        assert len(sd) == 0 and sd.keys() == [] and list(sd) == []
        sd['after_clear'] = 1
        assert sd.keys() == ['after_clear']
        """,
        h=sd_handle,
    )


def test_is_a_mutable_mapping(port, sd_handle):
    py(port, "assert isinstance(SharedDict(h), collections.abc.MutableMapping)", h=sd_handle)


def test_repr(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        sd['k'] = 1
        r = repr(sd)
        assert 'SharedDict' in r, r
        assert 'destroyed' not in r.lower(), r
        sd.destroy()
        r = repr(sd)
        assert 'destroyed' in r.lower(), r
        """,
        h=sd_handle,
    )


def test_str_and_bytes_keys_are_the_same(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        sd['k'] = 1
        assert sd[b'k'] == 1 and b'k' in sd
        sd[b'j'] = 2
        assert sd['j'] == 2
        sd['ключ'] = 3
        assert sd['ключ'.encode()] == 3
        assert sd.keys() == ['k', 'j', 'ключ']
        del sd[b'k']
        assert 'k' not in sd
        sd['k'] = 4
        """,
        h=sd_handle,
    )
    assert found(port, sd_handle, "ключ") == (A("found"), 3)
    assert found(port, sd_handle, b"j") == (A("found"), 2)
    assert port.sd_keys(sd_handle) == ("ok", [b"j", "ключ".encode(), b"k"])
    assert port.sd_set(sd_handle, "e", 5) == ("ok", A("ok"))
    py(port, "sd = SharedDict(h)\nassert sd['e'] == 5 and sd[b'e'] == 5 and sd.get('e') == 5", h=sd_handle)


def test_values_are_isolated(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        x = [1, {'a': [2]}]
        sd['x'] = x
        x.append(3)
        x[1]['a'].append(9)
        assert sd['x'] == [1, {'a': [2]}]
        v = sd['x']
        v.append('mutated')
        v[1]['a'].clear()
        assert sd['x'] == [1, {'a': [2]}]
        assert sd['x'] is not sd['x']
        """,
        h=sd_handle,
    )


def test_unpicklable_value_raises_pickle_error(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        sd['bad'] = 'old'
        for v in (lambda: 0, threading.Lock(), (i for i in [])):
            try:
                pickle.dumps(v)
            except Exception as e:
                expected = type(e)
            else:
                raise AssertionError('picklable?')
            got = raises(Exception, sd.__setitem__, 'bad', v)
            assert type(got) is expected, (type(got), expected, got)
            assert sd['bad'] == 'old'
            got = raises(Exception, sd.__setitem__, 'new_bad', v)
            assert type(got) is expected
            assert 'new_bad' not in sd
        """,
        h=sd_handle,
    )


def test_stores_python_objects(port, sd_handle):
    py(
        port,
        """
        import decimal, fractions, datetime
        sd = SharedDict(h)
        vals = {'dec': decimal.Decimal('1.5'), 'frac': fractions.Fraction(1, 3),
                'date': datetime.date(2024, 1, 2), 'set': {1, 2}, 'pid': p, 'h': h,
                'tuple': (1, (2, 'x')), 'bytes': b'\\xff', 'big': 2 ** 200, 'float': 0.1}
        for k, v in vals.items():
            sd[k] = v
        for k, v in vals.items():
            assert sd[k] == v, (k, sd[k], v)
        assert type(sd['pid']) is erlang.OpaqueTerm
        """,
        h=sd_handle,
        p=pid(42),
    )
    # Read from Erlang: the same forms as replies (a Decimal's tagged form, a Fraction opaque).
    assert found(port, sd_handle, "dec") == (A("found"), (A("$pyport_decimal"), b"1.5"))
    tag, frac = found(port, sd_handle, "frac")
    assert tag == "found" and frac[0] == "python_object" and frac[2] == b"Fraction(1, 3)", frac
    assert found(port, sd_handle, "pid") == (A("found"), Opaque(pid(42)))
    assert found(port, sd_handle, "h") == (A("found"), sd_handle)
    tag, v = found(port, sd_handle, "set")
    assert tag == "found" and sorted(v) == [1, 2]
    assert found(port, sd_handle, "tuple") == (A("found"), (1, (2, b"x")))
    assert found(port, sd_handle, "bytes") == (A("found"), b"\xff")
    assert found(port, sd_handle, "big") == (A("found"), 2**200)


def test_destroy_from_python(port, sd_handle):
    py(
        port,
        """
        sd = SharedDict(h)
        other = SharedDict(h)
        sd['a'] = 1
        sd.destroy()
        sd.destroy()
        ops = {
            'getitem': lambda s: s['a'], 'setitem': lambda s: s.__setitem__('a', 1),
            'delitem': lambda s: s.__delitem__('a'), 'contains': lambda s: 'a' in s,
            'get': lambda s: s.get('a'), 'get_default': lambda s: s.get('a', 0),
            'keys': lambda s: s.keys(), 'len': len, 'iter': list,
            'items': lambda s: list(s.items()), 'values': lambda s: list(s.values()),
            'pop': lambda s: s.pop('a'), 'pop_default': lambda s: s.pop('a', None),
            'setdefault': lambda s: s.setdefault('a', 1), 'update': lambda s: s.update({'a': 1}),
            'clear': lambda s: s.clear(),
        }
        for s in (sd, other, SharedDict(h)):
            for name, op in ops.items():
                e = raises(RuntimeError, op, s)
                assert str(e) == DESTROYED, (name, str(e))
            assert 'destroyed' in repr(s).lower()
            s.destroy()
        """,
        h=sd_handle,
        DESTROYED=DESTROYED,
    )
    for op, args in (("sd_get", ("a",)), ("sd_keys", ()), ("sd_del", ("a",))):
        assert port.sd(op, sd_handle, *args) == ("error", A("shared_dict_destroyed")), op
    assert port.sd_set(sd_handle, "a", 1) == ("error", A("shared_dict_destroyed"))
    assert port.sd_destroy(sd_handle) == ("ok", A("ok"))


def test_destroy_from_erlang_seen_by_python(port, sd_handle):
    py(port, "keep = SharedDict(h)\nkeep['a'] = 1", h=sd_handle)
    assert port.sd_destroy(sd_handle) == ("ok", A("ok"))
    assert port.sd_destroy(sd_handle) == ("ok", A("ok"))
    py(
        port,
        """
        for s in (keep, SharedDict(h)):
            e = raises(RuntimeError, lambda: s['a'])
            assert str(e) == DESTROYED
            raises(RuntimeError, s.__setitem__, 'b', 2)
            raises(RuntimeError, s.keys)
            assert 'destroyed' in repr(s).lower()
            s.destroy()
        """,
        h=sd_handle,
        DESTROYED=DESTROYED,
    )


# --- the wire operations ------------------------------------------------------------------------


def test_wire_ops(port, sd_handle):
    h = sd_handle
    assert port.sd_get(h, "missing") == ("ok", A("not_found"))
    assert port.sd_set(h, "config", {A("host"): "localhost", A("port"): 8080}) == ("ok", A("ok"))
    assert found(port, h, "config") == (A("found"), {b"host": b"localhost", b"port": 8080})
    assert port.sd_set(h, "b", [-1, 2, 2**70, 1.5, None, True, (b"\xff",)]) == ("ok", A("ok"))
    assert found(port, h, "b") == (A("found"), [-1, 2, 2**70, 1.5, None, True, (b"\xff",)])
    assert port.sd_set(h, "a", []) == ("ok", A("ok"))
    assert port.sd_keys(h) == ("ok", [b"config", b"b", b"a"])
    assert port.sd_set(h, "b", 0) == ("ok", A("ok"))
    assert found(port, h, "b") == (A("found"), 0)
    assert port.sd_del(h, "config") == ("ok", A("ok"))
    assert port.sd_del(h, "config") == ("ok", A("ok"))
    assert port.sd_get(h, "config") == ("ok", A("not_found"))
    assert port.sd_keys(h)[1] in ([b"b", b"a"], [b"a", b"b"])
    assert port.sd_set(h, "p", pid(77)) == ("ok", A("ok"))
    assert found(port, h, "p") == (A("found"), Opaque(pid(77)))
    # Python sees what Erlang stored, converted by the table.
    assert port.eval_ok(
        "__import__('erlang').SharedDict(h)['b'] == 0 and __import__('erlang').SharedDict(h)['a'] == []", h=h
    ) is True
    # A value that cannot be stored: an error, and the dict is unchanged.
    status, r = port.sd_set(h, "b", ImproperList([1, 2]))
    assert status == "error" and isinstance(r, tuple) and r[0] == "unsupported_term", r
    assert found(port, h, "b") == (A("found"), 0)
    assert port.sd_destroy(h) == ("ok", A("ok"))
    assert port.sd_destroy(h) == ("ok", A("ok"))
    assert port.sd_get(h, "b") == ("error", A("shared_dict_destroyed"))
    assert port.sd_set(h, "b", 1) == ("error", A("shared_dict_destroyed"))
    assert port.sd_keys(h) == ("error", A("shared_dict_destroyed"))
    assert port.sd_del(h, "b") == ("error", A("shared_dict_destroyed"))
    port.assert_serving()


def test_wire_ops_bad_arguments(port, sd_handle):
    for op, args in (
        ("sd_get", (sd_handle, A("k"))),
        ("sd_get", (sd_handle, 42)),
        ("sd_del", (sd_handle, [1])),
        ("sd_get", (42, "k")),
        ("sd_keys", ((A("$pyport_shared_dict"), 0),)),
        ("sd_keys", ((A("$pyport_shared_dict"), 0, 1, 2),)),
        ("sd_destroy", ("not a handle",)),
        ("sd_set", (sd_handle, "k", b"\x83zz")),
        ("sd_set", (sd_handle, "k", 5)),
        ("sd_new", ()),
        ("sd_give_away", (sd_handle, A("nopid"))),
    ):
        status, r = port.sd(op, *args)
        # A payload that is not ETF is a bad term; every other malformed field a bad request.
        expected = "bad_term" if args and args[-1] == b"\x83zz" else "bad_request"
        assert status == "error" and isinstance(r, tuple) and r[0] == expected, (op, args, r)
    assert port.sd_keys(sd_handle) == ("ok", [])
    port.assert_serving()


def test_non_utf8_key_from_erlang(port, sd_handle):
    assert port.sd_set(sd_handle, b"\xff\xfe", 1) == ("ok", A("ok"))
    assert found(port, sd_handle, b"\xff\xfe") == (A("found"), 1)
    assert port.sd_keys(sd_handle) == ("ok", [b"\xff\xfe"])
    assert port.eval_ok("__import__('erlang').SharedDict(h)[b'\\xff\\xfe']", h=sd_handle) == 1
    port.assert_serving()


def test_wire_ops_large_value(port, sd_handle):
    blob = b"\xfe" * (3 * 1024 * 1024)
    assert port.sd_set(sd_handle, "blob", {"data": blob, "n": list(range(1000))}) == ("ok", A("ok"))
    assert found(port, sd_handle, "blob") == (A("found"), {b"data": blob, b"n": list(range(1000))})
    assert port.eval_ok("len(__import__('erlang').SharedDict(h)['blob']['data'])", h=sd_handle) == len(blob)


def test_fabricated_handles_cannot_reach_the_dict(port_factory):
    p = port_factory(["--generation", "5"])
    h = p.sd_new()
    assert p.sd_set(h, "secret", "value") == ("ok", A("ok"))
    tag, gen, did, token = h
    fakes = [
        (tag, gen, did, bytes(16)),
        (tag, gen, did, bytes(b ^ 1 for b in token)),
        (tag, gen, did, token[:15]),
        (tag, gen + 1, did, token),
        (tag, gen, did + 1000, token),
    ]
    for fake in fakes:
        for op, args in (("sd_get", ("secret",)), ("sd_keys", ()), ("sd_del", ("secret",))):
            assert p.sd(op, fake, *args) == ("error", A("shared_dict_destroyed")), (op, fake)
        assert p.sd_set(fake, "secret", "pwned") == ("error", A("shared_dict_destroyed"))
        assert p.sd_destroy(fake) == ("ok", A("ok"))
        assert found(p, h, "secret") == (A("found"), b"value")
        py(
            p,
            """
            leaked = []
            try:
                f = SharedDict(fake)
            except (TypeError, RuntimeError, ValueError):
                f = None
            if f is not None:
                for op in (lambda: leaked.append(f['secret']), lambda: f.__setitem__('secret', 'pwned'),
                           lambda: leaked.append(f.keys()), lambda: leaked.append(len(f)), f.clear):
                    raises(RuntimeError, op)
                f.destroy()
            assert leaked == [], leaked
            assert SharedDict(h)['secret'] == 'value'
            """,
            h=h,
            fake=fake,
        )
    assert p.sd_keys(h) == ("ok", [b"secret"])


def test_dead_owners_dicts_are_dropped_by_the_pool_not_by_owner_down(port):
    """A dict belongs to the pool: a port's owner_down (which frees the owner's namespace
    there) leaves it; sd_drop_owners, which the Erlang side's watcher sends once per dead
    owner to any port, destroys exactly that owner's dicts."""
    a, b = pid(301), pid(302)
    base = port.stats()[A("dicts")]
    ha, hb = port.sd_new(owner=a), port.sd_new(owner=b)
    assert port.stats()[A("dicts")] == base + 2
    port.sd_set(ha, "k", 1)
    port.sd_set(hb, "k", 2)
    py(port, "held = SharedDict(ha)\nassert held['k'] == 1", ha=ha)
    port.owner_down(a)
    port.assert_serving()
    assert found(port, ha, "k") == (A("found"), 1)
    assert port.drop_owners([a]) == ("ok", 1)
    assert port.sd_get(ha, "k") == ("error", A("shared_dict_destroyed"))
    assert port.stats()[A("dicts")] == base + 1
    assert found(port, hb, "k") == (A("found"), 2)
    py(port, "e = raises(RuntimeError, lambda: held['k'])\nassert str(e) == D", D=DESTROYED)
    assert port.drop_owners([a]) == ("ok", 0), "a second drop finds nothing"
    assert port.drop_owners([]) == ("ok", 0)
    assert port.drop_owners([b, pid(303)]) == ("ok", 1)
    assert port.stats()[A("dicts")] == base


def test_drop_owners_of_bad_shape_is_a_bad_request(port):
    status, reason = port.sd("sd_drop_owners", [1, 2])
    assert status == "error" and reason[0] == A("bad_request"), reason
    port.assert_serving()


def test_give_away(port):
    a, b = pid(401), pid(402)
    h = port.sd_new(owner=a)
    port.sd_set(h, "k", 1)
    assert port.sd_give_away(h, b) == ("ok", A("ok"))
    assert port.drop_owners([a]) == ("ok", 0)
    assert found(port, h, "k") == (A("found"), 1)
    assert port.drop_owners([b]) == ("ok", 1)
    assert port.sd_get(h, "k") == ("error", A("shared_dict_destroyed"))


def test_stats_track_dicts(port):
    s0 = port.stats()
    h = port.sd_new()
    port.sd_set(h, "k1", "x" * 1000)
    port.sd_set(h, "k2", 1)
    s1 = port.stats()
    assert s1[A("dicts")] == s0[A("dicts")] + 1
    assert s1[A("dict_keys")] == s0[A("dict_keys")] + 2
    assert s1[A("dict_bytes")] >= s0[A("dict_bytes")] + 1000
    port.sd_destroy(h)
    s2 = port.stats()
    assert (s2[A("dicts")], s2[A("dict_keys")], s2[A("dict_bytes")]) == (
        s0[A("dicts")],
        s0[A("dict_keys")],
        s0[A("dict_bytes")],
    )


@pytest.mark.parametrize("blocker", ["sleep", "busy_loop"])
def test_sd_ops_do_not_wait_behind_python(port_factory, blocker, tmp_path):
    """Ordering, not wall-clock: the only worker is held (at most 60 s) until the test creates
    a flag file, which it does only after every SharedDict operation has been answered."""
    p = port_factory(["--workers", "1", "--max-workers", "1"])
    flag = tmp_path / "release"
    h = p.sd_new()
    step = {"sleep": "time.sleep(0.01)", "busy_loop": "pass"}[blocker]
    busy = p.exec(
        "import os, time\nt = time.monotonic()\n"
        "while not os.path.exists(flag) and time.monotonic() - t < 60:\n    %s\n" % step,
        {"flag": str(flag)},
    )
    queued = p.eval("'queued'")  # proves the only worker is taken: this waits
    h2 = p.sd_new()
    assert p.sd_set(h2, "k", {"v": [1, 2]}) == ("ok", A("ok"))
    assert found(p, h2, "k") == (A("found"), {b"v": [1, 2]})
    assert p.sd_set(h, "k", 1) == ("ok", A("ok"))
    assert p.sd_keys(h2) == ("ok", [b"k"])
    assert p.sd_del(h2, "k") == ("ok", A("ok"))
    assert p.sd_destroy(h2) == ("ok", A("ok"))
    assert busy not in p.pending, "the blocker finished before it was released"
    assert queued not in p.pending, "the queued eval was answered while the only worker was busy"
    flag.write_text("go")
    assert p.ok(busy, timeout=60) is None
    assert p.ok(queued) == b"queued"


def test_python_threads_hammer_one_dict(port, sd_handle):
    """8 Python threads and an Erlang writer on the same dict at once: no deadlock, no crash, no
    torn value."""
    rid = port.exec(
        PRELUDE
        + textwrap.dedent(
            """
            sd = SharedDict(h)
            errors = []
            N, ITER = 8, 600
            def check(v):
                assert isinstance(v, tuple) and len(v) == 3 and v[2] == str(v[0]) * 50, v
            def worker(t):
                try:
                    for i in range(ITER):
                        sd['t%d' % t] = i
                        v = sd.get('shared')
                        if v is not None:
                            check(v)
                        sd['shared'] = (t, i, str(t) * 50)
                        assert sd['t%d' % t] == i
                        sd['tmp%d' % t] = [t] * 20
                        del sd['tmp%d' % t]
                        if i % 25 == 0:
                            ks = sd.keys()
                            assert 't%d' % t in ks
                            len(sd)
                            list(sd.items())
                        sd.setdefault('counter', 0)
                except BaseException as e:
                    errors.append('thread %d: %r' % (t, e))
            threads = [threading.Thread(target=worker, args=(t,)) for t in range(N)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            assert not any(th.is_alive() for th in threads), 'deadlock: threads still running'
            assert not errors, errors
            for t in range(N):
                assert sd['t%d' % t] == ITER - 1
            check(sd['shared'])
            """
        ),
        {"h": sd_handle},
    )
    # Meanwhile, from "Erlang": writes and reads of the same keys.
    for i in range(300):
        assert port.sd_set(sd_handle, "shared", (100 + i % 3, i, str(100 + i % 3) * 50)) == ("ok", A("ok"))
        status, v = port.sd_get(sd_handle, "shared")
        assert status == "ok"
        if v != "not_found":
            tag, val = v
            assert isinstance(val, tuple) and val[2] == str(val[0]).encode() * 50, val
        if i % 50 == 0:
            assert port.sd_keys(sd_handle)[0] == "ok"
    assert port.ok(rid, timeout=90) is None
    status, keys = port.sd_keys(sd_handle)
    assert status == "ok" and {b"t%d" % t for t in range(8)} <= set(keys)
    port.assert_serving()


def test_reference_quick_start_python(port, sd_handle):
    """The Python side of the reference's Quick Start, as printed."""
    port.exec_ok(
        textwrap.dedent(
            """
            from erlang import SharedDict

            def process_with_config(sd_handle):
                # Wrap the handle
                sd = SharedDict(sd_handle)

                # Dict-like access
                config = sd['config']
                host = config.get('host') or config.get(b'host')

                # Set values
                sd['result'] = {'status': 'ok', 'count': 42}

                # Check membership
                if 'config' in sd:
                    print("Config found")

                # Iterate keys
                for key in sd.keys():
                    print(f"Key: {key}")

                # Delete
                del sd['result']
                return host
            """
        )
    )
    assert port.sd_set(sd_handle, "config", {A("host"): "localhost", A("port"): 8080}) == ("ok", A("ok"))
    assert port.ok(port.call("__main__", "process_with_config", [sd_handle])) == b"localhost"
    assert port.sd_keys(sd_handle) == ("ok", [b"config"])
    assert port.sd_get(sd_handle, "missing") == ("ok", A("not_found"))
