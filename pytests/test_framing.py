"""{packet,4} framing, the ready frame, out-of-order replies and the elastic pool."""

import os
import struct
import time

from conftest import A, Atom, b2t, frame, pid, t2b, wait_until


def test_ready_frame_first_and_once(port_factory):
    p = port_factory(["--workers", "2", "--max-workers", "5"], wait_ready=False)
    # Log lines may precede it, but no reply can.
    t = p.next_frame()
    while p.is_log(t):
        t = p.next_frame()
    assert p.is_ready(t), "first non-log frame is not pyport_ready: %r" % (t,)
    info = t[1]
    assert isinstance(info, dict)
    assert info[A("os_pid")] == p.proc.pid
    assert info[A("workers")] == 2
    assert info[A("max_workers")] == 5
    version = info[A("python")]
    if isinstance(version, bytes):
        version = version.decode()
    assert str(version).startswith("3."), version
    # The reported version is the interpreter actually running.
    import_ver = p.eval_ok("'%d.%d.%d' % __import__('sys').version_info[:3]")
    assert import_ver.decode() in str(version)
    for _ in range(3):
        p.assert_serving()
    assert len(p.ready) == 0, "pyport_ready sent again: %r" % (p.ready,)


def test_ready_reports_defaults(port):
    info = port.ready[0]
    assert info[A("workers")] == 1
    assert info[A("max_workers")] == 16


def test_several_frames_in_one_write(port):
    ids = [port.new_id() for _ in range(5)]
    data = b"".join(
        frame(t2b((A("eval"), rid, port.owner, "%d * 2" % i, t2b({})))) for i, rid in enumerate(ids)
    )
    port.send_raw(data)
    for i, rid in enumerate(ids):
        assert port.ok(rid) == i * 2


def test_frame_split_over_many_writes(port):
    rid = port.new_id()
    data = frame(t2b((A("eval"), rid, port.owner, "'split' * 3", t2b({}))))
    for i in range(len(data)):
        port.send_raw(data[i : i + 1])
    assert port.ok(rid) == b"splitsplitsplit"
    # Length prefix alone, then the body in two pieces, with a second frame glued to the end.
    rid2, rid3 = port.new_id(), port.new_id()
    f2 = frame(t2b((A("eval"), rid2, port.owner, "2", t2b({}))))
    f3 = frame(t2b((A("eval"), rid3, port.owner, "3", t2b({}))))
    port.send_raw(f2[:4])
    port.send_raw(f2[4:10])
    port.send_raw(f2[10:] + f3[:3])
    port.send_raw(f3[3:])
    assert port.ok(rid2) == 2
    assert port.ok(rid3) == 3


def test_ten_mib_round_trip(port):
    blob = b"\xff" + os.urandom(10 * 1024 * 1024 - 1)  # not UTF-8: bytes both ways
    rid = port.eval("v", {"v": blob})
    assert port.ok(rid, timeout=60) == blob
    rid = port.call("builtins", "len", [blob])
    assert port.ok(rid, timeout=60) == len(blob)
    text = "é" * (5 * 1024 * 1024)  # 10 MiB of UTF-8: str in Python
    assert port.eval_ok("len(v)", v=text, timeout=60) == len(text)
    assert port.eval_ok("v[::-1]", v=text, timeout=60) == text.encode()


# Ordering, not wall-clock: the slow request waits (at most 60 s) for a flag file that the test
# creates only after the fast reply has arrived, so "the fast one overtakes" cannot depend on
# how loaded the machine is.
WAIT_FOR_FLAG = (
    "import os, time\nt = time.monotonic()\n"
    "while not os.path.exists(flag) and time.monotonic() - t < 60:\n    {step}\n"
)


def test_out_of_order_sleep(port, tmp_path):
    flag = tmp_path / "release"
    # Two processes: one process's requests run on its home thread, one after another.
    slow = port.exec(WAIT_FOR_FLAG.format(step="time.sleep(0.01)"), {"flag": str(flag)}, owner=pid(2))
    fast = port.eval("'fast'", owner=pid(3))
    first = port.recv(timeout=30)
    assert first[0] == fast, "the fast call did not overtake the slow one: %r" % (first,)
    assert slow not in port.pending
    flag.write_text("go")
    assert port.ok(slow, timeout=60) is None


def test_out_of_order_busy_loop(port, tmp_path):
    """A GIL-bound loop in one call must not stall another caller."""
    flag = tmp_path / "release"
    slow = port.exec(WAIT_FOR_FLAG.format(step="pass"), {"flag": str(flag)}, owner=pid(2))
    fast = port.eval("1 + 1", owner=pid(3))
    assert port.ok(fast, timeout=30) == 2
    assert port.pending == {}, "the busy loop finished before it was released"
    flag.write_text("go")
    assert port.ok(slow, timeout=60) is None


def test_concurrent_sleepers_run_in_parallel(port):
    """Six requests that can only finish together (a barrier of six) all finish: they ran at
    the same time, on six workers. Run one after another, the first would time out waiting."""
    port.exec_ok(
        "import sys, threading, types\n"
        "m = types.ModuleType('pyport_test_barrier')\n"
        "m.barrier = threading.Barrier(6)\n"
        "sys.modules['pyport_test_barrier'] = m\n"
    )
    ids = [
        port.eval("__import__('pyport_test_barrier').barrier.wait(30) >= 0 and %d" % i, owner=pid(300 + i))
        for i in range(6)
    ]
    for i, rid in enumerate(ids):
        assert port.ok(rid, timeout=60) == i


def test_new_home_never_shares_a_worker_that_took_a_request(port_factory):
    """A worker that has taken a request off its queue but still waits for the GIL is busy: a
    namespace created meanwhile gets a thread of its own, not that one (it would wait behind
    the first request, or deadlock with it)."""
    p = port_factory(["--workers", "2", "--max-workers", "4"])
    hog = p.eval("sum(range(10**8))")  # seconds in C, holding the GIL
    wait_until(lambda: p.stats()["busy_workers"] == 1, 10, "the loop is running")
    first = p.eval("__import__('threading').get_ident()", owner=pid(401))
    # The idle worker took `first` off its queue; it now waits for the GIL the loop holds.
    wait_until(lambda: sum(p.stats()["thread_queues"]) == 0, 10, "the request left its queue")
    second = p.eval("__import__('threading').get_ident()", owner=pid(402))
    # The reader answers stats in frame order, so `second` had its home by then: if the
    # loop's reply has not come yet, the loop still held the GIL when that home was chosen.
    p.stats()
    assert hog not in p.pending, "the loop ended before the second home was chosen: the test proved nothing"
    assert p.ok(hog, timeout=60) == sum(range(10**8))
    assert p.ok(first, timeout=60) != p.ok(second, timeout=60)


def test_max_workers_caps_the_pool(port_factory):
    p = port_factory(["--workers", "1", "--max-workers", "2"])
    t0 = time.monotonic()
    ids = [p.eval("__import__('time').sleep(0.6) or %d" % i) for i in range(4)]
    for i, rid in enumerate(ids):
        assert p.ok(rid) == i
    elapsed = time.monotonic() - t0
    assert elapsed >= 1.1, "4 sleeps of 0.6 s with 2 workers took only %.2f s" % elapsed


def test_large_id_values(port):
    for rid in (1, 2**31, 2**63 - 1):
        port.eval("1", rid=rid)
        t = port.recv()
        assert t[0] == rid and t[1] == "ok", t


def test_huge_length_prefix_exits(port):
    """A corrupt length prefix must make the port exit promptly (status 3), not hang or try to
    allocate 4 GiB. stdin stays open: it is the prefix, not EOF, that ends the process."""
    port.send_raw(struct.pack(">I", 0xFFFFFFF0) + b"\x83h\x02")
    rc = port.wait_exit(5)
    assert rc is not None, "port still running 5 s after a 0xFFFFFFF0 length prefix"
    assert rc == 3, "exit status %r, expected 3 (PROTOCOL.md)" % rc


def test_length_prefix_over_max_frame_bytes_exits(port_factory):
    p = port_factory(["--max-frame-bytes", "4096"])
    p.assert_serving()
    body = t2b((A("eval"), p.new_id(), p.owner, "1", t2b({"v": b"x" * 5000})))
    p.send_raw(struct.pack(">I", len(body)))
    rc = p.wait_exit(5)
    assert rc == 3, "exit status %r after a %d-byte prefix with --max-frame-bytes 4096" % (rc, len(body))


def test_frame_at_max_frame_bytes_is_served(port_factory):
    p = port_factory(["--max-frame-bytes", "4096"])
    rid = p.new_id()
    code = "len(v)"
    base = t2b((A("eval"), rid, p.owner, code, t2b({"v": b""})))
    body = t2b((A("eval"), rid, p.owner, code, t2b({"v": b"\xff" * (4096 - len(base))})))
    assert len(body) == 4096
    p.send_body(body)
    assert p.ok(rid) == 4096 - len(base)


def test_pipelined_requests_answered_exactly_once(port):
    """2000 requests in one write (a mix of fast and slightly slow ones): each Id answered once."""
    ids = [port.new_id() for _ in range(2000)]
    data = b"".join(
        frame(t2b((A("eval"), rid, port.owner, "%d if %d %% 97 else __import__('time').sleep(0.01) or %d" % (i, i, i), t2b({}))))
        for i, rid in enumerate(ids)
    )
    port.send_raw(data)
    seen = {}
    while len(seen) < len(ids):
        t = port.recv(timeout=60)
        assert t[0] not in seen, "second reply for %r" % (t[0],)
        seen[t[0]] = t
    for i, rid in enumerate(ids):
        assert seen[rid][1] == "ok" and b2t(seen[rid][2]) == i, seen[rid]
    port.assert_serving()
