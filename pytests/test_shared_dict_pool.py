"""SharedDicts in the pool's shared memory, seen from port programs: one store mapped by
several ports, changes that wait for the VM to forget what it caches, the size bound, and a
store that outlives a killed port."""

import os
import signal
import textwrap

import pytest

from conftest import A, describe_error, pid, t2b

POOL_GEN = 4242


@pytest.fixture
def shm_path(tmp_path):
    path = tmp_path / "pool.sd"
    yield str(path)
    if path.exists():
        path.unlink()


def pool_port(port_factory, shm_path, size=1 << 24, generation=POOL_GEN, **kw):
    return port_factory(
        ["--shm-path", shm_path, "--shm-size", str(size), "--pool-generation", str(generation)], **kw
    )


def run(port, code, **locals):
    return port.exec_ok(textwrap.dedent(code), **locals)


def cache_it(port, h, key):
    """An Erlang-side get, as the VM's read cache makes it: the reply may be cached."""
    status, v = port.sd_get(h, key)
    assert status == "ok", describe_error(v)
    return v


# --- one store, several ports --------------------------------------------------------------


def test_two_ports_share_one_store(port_factory, shm_path):
    a = pool_port(port_factory, shm_path)
    b = pool_port(port_factory, shm_path)
    h = a.sd_new()
    assert h[1] == POOL_GEN, "handles carry the pool's generation"
    assert a.sd_set(h, "from_erlang", 1) == ("ok", A("ok"))
    run(a, "from erlang import SharedDict\nSharedDict(h)['from_a'] = [1, 'two']", h=h)
    run(b, "from erlang import SharedDict\nd = SharedDict(h)\nd['from_b'] = d['from_a'] + [d['from_erlang']]", h=h)
    assert cache_it(a, h, "from_b") == (A("found"), [1, b"two", 1])
    assert cache_it(b, h, "from_b") == (A("found"), [1, b"two", 1])
    assert b.sd_keys(h) == ("ok", [b"from_erlang", b"from_a", b"from_b"])
    assert a.stats()[A("dicts")] == b.stats()[A("dicts")] == 1


def test_a_dict_outlives_a_killed_port(port_factory, shm_path):
    a = pool_port(port_factory, shm_path)
    b = pool_port(port_factory, shm_path)
    h = a.sd_new()
    run(a, "from erlang import SharedDict\nd = SharedDict(h)\nfor i in range(1000): d[str(i)] = i\nd.incr('n', 5)", h=h)
    os.kill(a.proc.pid, signal.SIGKILL)
    a.wait_exit(10)
    assert b.eval_ok("(lambda d: (len(d), d['999'], d['n']))(__import__('erlang').SharedDict(h))", h=h) == (1001, 999, 5)
    assert b.sd_check() == ("ok", [])
    c = pool_port(port_factory, shm_path)
    assert cache_it(c, h, "n") == (A("found"), 5)


def test_a_store_of_another_pool_is_refused(port_factory, shm_path):
    pool_port(port_factory, shm_path, generation=1)
    other = pool_port(port_factory, shm_path, generation=2, wait_ready=False)
    assert other.wait_exit(30) == 8
    said = other.stderr_text().encode() + bytes(other._buf)
    assert b"belongs to pool 1" in said, said


# --- changes wait for the VM to forget what it caches ---------------------------------------


def test_a_python_write_of_a_cached_entry_waits_for_the_vm(port_factory, shm_path):
    a = pool_port(port_factory, shm_path)
    h = a.sd_new()
    a.sd_set(h, "k", 1)
    a.ok(a.exec("from erlang import SharedDict\nd = SharedDict(h)", {"h": h}))
    # Not cached by anyone: a Python write goes straight through.
    a.exec_ok("d['k'] = 2")
    assert a.invalidations == []
    cache_it(a, h, "k")
    a.answer_invalidations = False
    rid = a.exec("d['k'] = 3")
    with pytest.raises(Exception):
        a.result(rid, 1.0)
    assert a.invalidations == [(h, b"k")]
    # Nothing changed while the VM has not answered; reads are not cacheable meanwhile.
    assert a.sd_get(h, "k") == ("ok", (A("found"), 2))
    token = a.unanswered_invalidations.pop()
    a.send((A("sd_invalidated"), token))
    a.ok(rid)
    assert a.sd_get(h, "k") == ("ok", (A("found"), 3))
    assert a.invalidations == [(h, b"k")], "the read while the change waited was not cached"


def test_a_cancelled_wait_changes_nothing_and_asks_again(port_factory, shm_path):
    a = pool_port(port_factory, shm_path)
    h = a.sd_new()
    a.sd_set(h, "k", 1)
    a.ok(a.exec("from erlang import SharedDict\nd = SharedDict(h)", {"h": h}))
    cache_it(a, h, "k")
    a.answer_invalidations = False
    rid = a.exec("d['k'] = 2")
    with pytest.raises(Exception):
        a.result(rid, 1.0)
    a.cancel(rid)
    status, reason = a.result(rid)
    assert status == "error" and reason == A("cancelled"), reason
    assert a.sd_get(h, "k") == ("ok", (A("found"), 1))
    a.answer_invalidations = True
    a.invalidations.clear()
    a.exec_ok("d['k'] = 4")
    assert a.invalidations == [(h, b"k")], "the VM may still hold it: asked again"


def test_whole_dict_changes_wait_for_the_vm(port_factory, shm_path):
    a = pool_port(port_factory, shm_path)
    owner = pid(77)
    h1, h2, h3 = a.sd_new(), a.sd_new(), a.sd_new(owner=owner)
    for h in (h1, h2, h3):
        a.sd_set(h, "k", 1)
        cache_it(a, h, "k")
    run(a, "from erlang import SharedDict\nSharedDict(h1).clear()", h1=h1)
    assert a.sd_destroy(h2) == ("ok", A("ok"))
    assert a.drop_owners([owner]) == ("ok", 1)
    assert a.invalidations == [(h1,), (h2,), (h3,)]
    # Nothing cached any more: no waits.
    a.invalidations.clear()
    run(a, "from erlang import SharedDict\nSharedDict(h1)['k'] = 2\nSharedDict(h1).clear()", h1=h1)
    assert a.invalidations == []


# --- the size bound --------------------------------------------------------------------------


def test_a_full_store_refuses_writes_alone_and_reuses_space(port_factory, shm_path):
    a = pool_port(port_factory, shm_path, size=1 << 20)
    h = a.sd_new()
    run(
        a,
        """
        from erlang import SharedDict
        d = SharedDict(h)
        d['small'] = 1
        n = 0
        try:
            while True:
                d['big%d' % n] = b'x' * 10000
                n += 1
        except MemoryError as e:
            err = str(e)
        assert 'shared_dict_memory' in err, err
        assert 20 < n < 110, n
        assert d['small'] == 1 and len(d) == n + 1
        """,
        h=h,
    )
    status, reason = a.sd_set(h, "more", b"y" * 20000)
    assert (status, reason) == ("error", A("shared_dict_full"))
    assert a.sd_get(h, "small") == ("ok", (A("found"), 1))
    run(a, "for i in range(n): del d['big%d' % i]\nfor i in range(n): d['again%d' % i] = b'y' * 10000")
    assert a.sd_set(h, "more", b"z" * 1000) == ("ok", A("ok"))
    assert a.sd_check() == ("ok", [])
