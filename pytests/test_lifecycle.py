"""Process lifecycle: EOF shutdown (also while busy), no orphans, signals, cancellation."""

import os
import signal

import pytest

from conftest import A, Atom, describe_error, group_members, pid_alive, wait_until


# Exits on EOF are liveness checks with a generous bound (the CI box is a loaded 2-core
# machine); the 60 s sleep / endless loop in the port is what makes "by itself" meaningful.


def test_eof_when_idle_exits(port):
    port.close_stdin()
    rc = port.wait_exit(10)
    assert rc == 0, "port still running (or failed) 10 s after its stdin closed: %r" % rc


def test_eof_while_worker_sleeps_exits(port):
    rid = port.exec("import time\ntime.sleep(60)")
    port.assert_serving()  # the sleeper is really running
    port.close_stdin()
    rc = port.wait_exit(10)
    assert rc == 0, "port still running 10 s after EOF with a worker in time.sleep(60): %r" % rc


def test_eof_while_worker_loops_exits(port):
    port.exec("while True:\n    pass\n")
    port.assert_serving()
    port.close_stdin()
    assert port.wait_exit(10) == 0, "port still running 10 s after EOF with a busy loop"


def test_children_gone_after_eof(port):
    pids = port.eval_ok(
        "[__import__('subprocess').Popen(['sleep', '60']).pid,"
        " __import__('subprocess').Popen(['sh', '-c', 'sleep 61; true']).pid]"
    )
    assert all(pid_alive(p) for p in pids)
    # The grandchild (sh's `sleep 61`) exists before the port is told to exit. (A process
    # forked while the port is scanning its group on exit can escape the scan: a product
    # race, rare, and not what this test pins.)
    wait_until(lambda: len(group_members(port.pgid)) >= 4, 10, "the port, sleep, sh and sh's sleep")
    family = group_members(port.pgid)
    port.exec("import time\ntime.sleep(60)")
    port.close_stdin()
    assert port.wait_exit(10) == 0
    wait_until(lambda: not any(pid_alive(p) for p in family), 10, "the port's group to exit: %r" % family)


def test_protocol_fds_not_inherited(port):
    """A child started without close_fds (posix_spawn) must not hold the protocol pipes: it
    would keep them open after the port dies."""
    code = (
        "import os, sys, tempfile\n"
        "out = tempfile.mktemp()\n"
        "child = \"import os; fds = sorted(int(f) for f in os.listdir('/proc/self/fd')); "
        "open(%r, 'w').write(repr(fds))\" % out\n"
        "p = os.posix_spawn(sys.executable, [sys.executable, '-c', child], dict(os.environ))\n"
        "os.waitpid(p, 0)\n"
        "fds = open(out).read()\n"
        "os.unlink(out)\n"
    )
    port.exec_ok(code)
    assert port.eval_ok("fds") == b"[0, 1, 2, 3]"  # 3 is the child's own listdir


def test_sigchld_default_subprocess_works(port):
    assert port.eval_ok("__import__('subprocess').run(['sh', '-c', 'exit 7']).returncode") == 7
    assert port.eval_ok("__import__('subprocess').check_output(['echo', 'hi'])") == b"hi\n"
    assert port.eval_ok(
        "(lambda os: os.waitpid(os.spawnlp(os.P_NOWAIT, 'true', 'true'), 0)[1])(__import__('os'))"
    ) == 0


def test_sigint_ignored(port):
    os.kill(port.proc.pid, signal.SIGINT)
    port.assert_serving()
    assert port.proc.poll() is None
    # Python code running at the time is not interrupted either.
    rid = port.eval("__import__('time').sleep(0.5) or 'done'")
    port.assert_serving()
    os.kill(port.proc.pid, signal.SIGINT)
    assert port.ok(rid) == b"done"


def test_cancel_running_busy_loop(port):
    rid = port.exec("while True:\n    pass\n")
    port.assert_serving()  # it is running (and the pool still answers)
    port.cancel(rid)
    # PROTOCOL.md: a request cancelled while it ran is answered `cancelled`, not as the
    # Python exception (erlang.CallCancelled) used to interrupt it.
    reason = port.err(rid, timeout=10)
    assert reason == "cancelled" and isinstance(reason, Atom), describe_error(reason)
    for _ in range(5):
        port.assert_serving()


def test_cancel_not_swallowed_by_except_exception(port):
    rid = port.exec(
        "while True:\n"
        "    try:\n"
        "        while True:\n"
        "            pass\n"
        "    except Exception:\n"
        "        pass\n"
    )
    port.assert_serving()
    port.cancel(rid)
    reason = port.err(rid, timeout=10)
    assert reason == "cancelled" and isinstance(reason, Atom), describe_error(reason)
    port.assert_serving()


def test_cancel_queued_request(port_factory):
    p = port_factory(["--workers", "1", "--max-workers", "1"])
    # The only worker loops (for at most 60 s) until it is cancelled, so `queued` is certainly
    # still queued when it is cancelled: no timing assumption.
    busy = p.exec(
        "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 60:\n    time.sleep(0.01)\n"
    )
    queued = p.exec("ran_anyway = True")
    p.cancel(queued)
    # Cancels are served in order: once the running one is answered `cancelled`, the cancel
    # of the queued one has been seen too.
    p.cancel(busy)
    assert p.err(busy, timeout=30) == "cancelled"
    assert p.err(queued, timeout=30) == "cancelled"
    err = p.eval_err("ran_anyway")
    assert err[0] == "python" and err[1] == "NameError", describe_error(err)


def test_cancel_does_not_hit_next_request(port_factory):
    """The interrupt is cleared between requests: cancelling a request that already finished, or
    racing the end of one, never raises in whatever that worker runs next."""
    p = port_factory(["--workers", "1", "--max-workers", "1"])
    for i in range(30):
        rid = p.eval("sum(range(%d))" % (i * 1000))
        p.cancel(rid)
        status, x = p.result(rid)
        # A deliberate race: the cancel may arrive before, while or after the code ran, so
        # both the result and `cancelled` are right; nothing else is.
        assert (status, x) in (("ok", i * 1000 * (i * 1000 - 1) // 2), ("error", "cancelled")), describe_error(x)
        nxt = p.exec("import time\nt = time.monotonic()\nwhile time.monotonic() - t < 0.01:\n    pass\n")
        assert p.ok(nxt) is None
    p.cancel(123456789)  # unknown id: ignored, no reply
    p.assert_serving()


def test_cancel_unknown_id_no_reply(port):
    port.cancel(987654321)
    port.assert_serving()
