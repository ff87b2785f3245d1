"""Python-side checks for shared_dict_SUITE (issue 3). Each check raises
AssertionError with a message naming what misbehaved; the suite matches on
the result, so a failure shows the Python traceback in the CT log."""
import datetime
import pickle
import threading
import time

import erlang
from erlang import SharedDict

DESTROYED = "SharedDict has been destroyed"


def _raises(exc, fn, what):
    try:
        fn()
    except exc:
        return
    except BaseException as e:  # noqa: BLE001 - report the wrong kind
        raise AssertionError(f'{what}: expected {exc}, got {type(e).__name__}: {e}')
    raise AssertionError(f'{what}: expected {exc}, nothing raised')


def mapping_behaviour(handle):
    """The full MutableMapping behaviour on an empty dict."""
    sd = SharedDict(handle)
    # SharedDict of a SharedDict wraps the same dict
    same = SharedDict(sd)
    assert len(sd) == 0, len(sd)
    sd['a'] = 1
    sd[b'b'] = [1, 2]
    sd['c'] = None
    assert len(sd) == 3 and len(same) == 3, (len(sd), len(same))
    keys = sd.keys()
    assert isinstance(keys, list), type(keys)
    assert keys == ['a', 'b', 'c'], keys
    assert all(type(k) is str for k in keys), keys
    assert list(sd) == ['a', 'b', 'c'], list(sd)
    assert 'a' in sd and b'a' in sd and 'zz' not in sd
    assert sd['a'] == 1 and sd[b'a'] == 1
    assert sd.get('c', 5) is None, 'a stored None must come back as None'
    assert sd.get('zz') is None and sd.get('zz', 5) == 5
    _raises(KeyError, lambda: sd['zz'], 'getitem of a missing key')

    def _del_missing():
        del sd['zz']
    _raises(KeyError, _del_missing, 'delitem of a missing key')
    assert list(sd.items()) == [('a', 1), ('b', [1, 2]), ('c', None)], list(sd.items())
    assert list(sd.values()) == [1, [1, 2], None], list(sd.values())
    assert sd.pop('a') == 1 and 'a' not in sd
    assert sd.pop('a', 'dflt') == 'dflt'
    _raises(KeyError, lambda: sd.pop('a'), 'pop of a missing key')
    assert sd.setdefault('d', 4) == 4 and sd.setdefault('d', 5) == 4
    sd.update({'e': 5}, f=6)
    sd.update([('g', 7)])
    assert sd == {'b': [1, 2], 'c': None, 'd': 4, 'e': 5, 'f': 6, 'g': 7}, dict(sd.items())
    k, v = sd.popitem()
    assert k not in sd and len(sd) == 5, (k, v, len(sd))
    r = repr(sd)
    assert isinstance(r, str) and 'SharedDict' in r, r
    # values are copies: mutating what was read changes nothing stored
    sd['b'] = [1, 2]
    v = sd['b']
    v.append(3)
    assert sd['b'] == [1, 2], sd['b']
    # unpicklable values raise the pickle error and store nothing
    for bad in (lambda: 1, threading.Lock()):
        def _store(bad=bad):
            sd['unpicklable'] = bad
        try:
            _store()
        except (pickle.PicklingError, TypeError, AttributeError):
            pass
        else:
            raise AssertionError(f'storing {bad!r} did not raise')
    assert 'unpicklable' not in sd
    sd.clear()
    assert len(sd) == 0 and sd.keys() == [], sd.keys()
    return True


def not_a_handle():
    """TypeError, with a message, for anything that is not a handle."""
    for bad in (42, 'x', None, b'h', {}, [], ('$pyport_shared_dict', 0, 1, b'0' * 16)):
        try:
            SharedDict(bad)
        except TypeError as e:
            assert str(e), f'TypeError without a message for {bad!r}'
        else:
            raise AssertionError(f'SharedDict({bad!r}) did not raise TypeError')
    return True


def destroyed_ops(handle):
    """Every operation on a destroyed dict raises erlang.SharedDictDestroyed (a
    RuntimeError, README) with message DESTROYED, except destroy() (idempotent)
    and repr (says it is destroyed).
    Returns the list of misbehaving operations (empty when all is well)."""
    bad = []
    if not issubclass(erlang.SharedDictDestroyed, RuntimeError):
        bad.append(f'SharedDictDestroyed bases: {erlang.SharedDictDestroyed.__mro__!r}')
    sd = SharedDict(handle)
    ops = {
        'getitem': lambda: sd['k'],
        'setitem': lambda: sd.__setitem__('k', 1),
        'delitem': lambda: sd.__delitem__('k'),
        'contains': lambda: 'k' in sd,
        'get': lambda: sd.get('k'),
        'keys': lambda: sd.keys(),
        'len': lambda: len(sd),
        'iter': lambda: list(iter(sd)),
        'items': lambda: list(sd.items()),
        'values': lambda: list(sd.values()),
        'pop': lambda: sd.pop('k', None),
        'setdefault': lambda: sd.setdefault('k', 1),
        'update': lambda: sd.update({'k': 1}),
        'clear': lambda: sd.clear(),
    }
    for name, op in ops.items():
        try:
            op()
            bad.append(f'{name}: no error')
        except erlang.SharedDictDestroyed as e:
            if str(e) != DESTROYED:
                bad.append(f'{name}: message {str(e)!r}')
        except BaseException as e:  # noqa: BLE001
            bad.append(f'{name}: {type(e).__name__}: {e}')
    try:
        sd.destroy()
        sd.destroy()
    except BaseException as e:  # noqa: BLE001
        bad.append(f'destroy: {type(e).__name__}: {e}')
    try:
        r = repr(sd)
        if 'destroyed' not in r.lower():
            bad.append(f'repr: {r!r}')
    except BaseException as e:  # noqa: BLE001
        bad.append(f'repr: {type(e).__name__}: {e}')
    return bad


def destroy(handle):
    SharedDict(handle).destroy()
    SharedDict(handle).destroy()
    return True


def store_python_values(handle):
    sd = SharedDict(handle)
    sd['t'] = {'a': (1, 2.5, None, b'\xff', True, '\u00e9')}
    sd['big'] = 2 ** 100
    sd['neg'] = [-1, 2]
    sd['set'] = {7}
    sd['nan'] = float('nan')
    sd['date'] = datetime.date(2020, 1, 2)
    sd[b'bkey'] = 'from bytes key'
    return True


def check_erlang_values(handle, pid, other_pid):
    """Values Erlang stored, as Python sees them. `pid` is the pid stored under 'pid', passed
    again as a call argument; `other_pid` is another process."""
    sd = SharedDict(handle)
    assert sd['int'] == 2 ** 100, sd['int']
    assert sd['float'] == 1.5
    assert sd['str'] == '\u00e9t\u00e9' and type(sd['str']) is str, sd['str']
    assert sd['bytes'] == b'\xff\x00' and type(sd['bytes']) is bytes, sd['bytes']
    assert sd['forced_bytes'] == b'abc' and type(sd['forced_bytes']) is bytes
    assert sd['atom'] == 'hello'
    assert sd['none'] is None
    assert sd['bool'] is True
    assert sd['list'] == [1, [2]]
    assert sd['tuple'] == (1, 'x')
    assert sd['map'] == {'a': 1, 2: 'b'}, sd['map']
    stored = sd['pid']
    assert type(stored) is erlang.OpaqueTerm, type(stored)
    assert stored == pid and hash(stored) == hash(pid), (stored, pid)
    assert stored != other_pid, (stored, other_pid)
    return True


def handle_roundtrip(handle):
    """A handle read back from a dict, or rebuilt by pickle, reaches the same dict."""
    sd = SharedDict(handle)
    inner = sd['self']
    SharedDict(inner)['via_stored_handle'] = 1
    again = pickle.loads(pickle.dumps(handle))
    SharedDict(again)['via_pickled_handle'] = 2
    return [inner, {'k': handle}, (handle,)]


def _consistent(v):
    tag, who, i, payload = v
    n = who * 100000 + i
    return len(payload) == 50 and all(x == n for x in payload)


def py_stress(handle, nthreads, nops):
    """nthreads Python threads write their own keys and a shared key, and check
    every read; returns the list of problems found (empty when all is well)."""
    sd = SharedDict(handle)
    problems = []
    start = threading.Barrier(nthreads)

    def worker(t):
        try:
            start.wait()
            for i in range(nops):
                n = t * 100000 + i
                sd[f'py{t}_{i}'] = ('py', t, i, [n] * 50)
                sd['shared'] = ('py', t, i, [n] * 50)
                v = sd.get('shared')
                if v is None or not _consistent(v):
                    problems.append(f'thread {t}: torn shared value {v!r:.200}')
                mine = sd[f'py{t}_{i}']
                if mine != ('py', t, i, [n] * 50):
                    problems.append(f'thread {t}: lost write {i}: {mine!r:.200}')
                if i % 50 == 0:
                    sd.keys()
                    len(sd)
        except BaseException as e:  # noqa: BLE001
            problems.append(f'thread {t}: {type(e).__name__}: {e}')

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return problems


def verify_py_keys(handle, nthreads, nops):
    sd = SharedDict(handle)
    missing = []
    for t in range(nthreads):
        for i in range(nops):
            n = t * 100000 + i
            if sd.get(f'py{t}_{i}') != ('py', t, i, [n] * 50):
                missing.append(f'py{t}_{i}')
    return missing


def hammer_until_destroyed(handle, nthreads, limit_s):
    """Threads write until the dict is destroyed (from Erlang); each reports how
    it ended: 'destroyed' is the only good answer."""
    sd = SharedDict(handle)
    outcomes = [None] * nthreads

    def worker(t):
        deadline = time.monotonic() + limit_s
        i = 0
        try:
            while time.monotonic() < deadline:
                sd[f'h{t}_{i}'] = i
                sd.get(f'h{t}_{i}')
                i += 1
            outcomes[t] = 'deadline'
        except RuntimeError as e:
            outcomes[t] = 'destroyed' if str(e) == DESTROYED else f'RuntimeError: {e}'
        except BaseException as e:  # noqa: BLE001
            outcomes[t] = f'{type(e).__name__}: {e}'

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return outcomes
