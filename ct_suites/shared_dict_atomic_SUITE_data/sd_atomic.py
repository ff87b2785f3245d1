"""Python side of shared_dict_atomic_SUITE: thread workers for the counter and
compare-and-swap tests, the writer of the causal-order test, and user classes
whose values only Python can decode (one of them hangs while being decoded).

Workers collect what went wrong and return it; the suite asserts the result is
empty, so a failure shows the Python message in the CT log."""
import threading
import time

import erlang
from erlang import SharedDict


def _run_threads(nthreads, target):
    """Runs target(t) in nthreads threads started together; joins them all and
    returns the problems they reported."""
    problems = []
    start = threading.Barrier(nthreads)

    def worker(t):
        try:
            start.wait()
            target(t)
        except BaseException as e:  # noqa: BLE001 - reported to the suite
            problems.append(f'thread {t}: {type(e).__name__}: {e}')

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return problems


def incr_threads(handle, key, nthreads, n):
    """nthreads threads each call sd.incr(key) n times; each returned value
    must be an int (the new value), and a thread's own results must grow."""
    sd = SharedDict(handle)

    def work(t):
        last = None
        for _ in range(n):
            v = sd.incr(key)
            if type(v) is not int:
                raise AssertionError(f'incr returned {v!r}, not an int')
            if last is not None and v <= last:
                raise AssertionError(f'incr went from {last} to {v}')
            last = v
    return _run_threads(nthreads, work)


def cas_threads(handle, key, nthreads, n):
    """nthreads threads each add 1 to the int at key n times with a
    read / compare_and_swap retry loop."""
    sd = SharedDict(handle)

    def work(t):
        done = 0
        while done < n:
            cur = sd[key]
            ok = sd.compare_and_swap(key, cur, cur + 1)
            if type(ok) is not bool:
                raise AssertionError(f'compare_and_swap returned {ok!r}, not a bool')
            if ok:
                done += 1
    return _run_threads(nthreads, work)


def write_then_return(handle, n):
    """Stores n at 'k' and returns n: directly for even n, from a thread that
    is joined before returning for odd n (a write made on another thread is
    just as visible to whoever gets the reply)."""
    sd = SharedDict(handle)
    if n % 2 == 0:
        sd['k'] = n
    else:
        t = threading.Thread(target=sd.__setitem__, args=('k', n))
        t.start()
        t.join()
    return n


def set_value(handle, key, value):
    SharedDict(handle)[key] = value
    return True


def destroy(handle):
    SharedDict(handle).destroy()
    return True


class Hang:
    """Pickles into a call of time.sleep(100000): decoding it never ends."""

    def __reduce__(self):
        return (time.sleep, (100000,))


class Quick:
    """A user class: only Python can decode it, and that is quick."""

    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f'Quick({self.n})'


def store_user_values(handle):
    """Two values whose decoding hangs and one that decodes at once."""
    sd = SharedDict(handle)
    sd['hang1'] = Hang()
    sd['hang2'] = Hang()
    sd['quick'] = Quick(7)
    return True


def store_plain_values(handle):
    """Plain values (no user classes) stored from Python."""
    sd = SharedDict(handle)
    sd['py_int'] = 12345
    sd['py_list'] = [1, 'two', 3.5, None, True]
    sd['py_map'] = {'a': [1, 2], 'b': {'c': 'd'}}
    return True


def store_quick(handle, key):
    """One user-class value, decoded quickly."""
    SharedDict(handle)[key] = Quick(7)
    return True


def delete(handle, key):
    del SharedDict(handle)[key]
    return True
