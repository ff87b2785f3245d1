"""Documented promises of the port program that no other test file pins: exit statuses 2, 4
and 5, spare workers starting under load and exiting when idle, and `python_object` repr
truncation (docs/PROTOCOL.md)."""

import os
import subprocess

from conftest import PYPORT_BIN, A, pid, wait_until


def run_port(args=(), stdin=subprocess.DEVNULL, env=None):
    """Runs the port to its exit (at most 30 s); returns (status, stdout bytes, stderr text)."""
    p = subprocess.run(
        [PYPORT_BIN] + list(args),
        stdin=stdin,
        capture_output=True,
        timeout=30,
        env=env,
        start_new_session=True,
    )
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace")


def test_exit_status_2_on_a_bad_command_line():
    status, out, err = run_port(["--no-such-flag", "1"])
    assert status == 2, (status, err)
    assert out == b"", "a refused command line must not start the protocol: %r" % out[:200]
    status, _, err = run_port(["--workers", "abc"])
    assert status == 2, (status, err)
    assert "--workers" in err, err


def test_exit_status_4_on_an_io_error_on_the_protocol_input():
    # A directory as standard input: read() fails with EISDIR, an I/O error that is not EOF.
    fd = os.open("/", os.O_RDONLY)
    try:
        status, out, err = run_port(stdin=fd)
    finally:
        os.close(fd)
    assert status == 4, (status, err)
    assert b"reading requests" in out, "the reason is logged through the protocol: %r" % out[-300:]


def test_exit_status_5_when_python_cannot_initialise(tmp_path):
    # Python starts, but the port cannot set itself up in it: the erlang module imports uuid,
    # and a broken uuid.py on PYTHONPATH shadows the standard one.
    (tmp_path / "uuid.py").write_text("raise ImportError('a broken uuid module')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    status, out, err = run_port(env=env)
    assert status == 5, (status, err[-2000:])
    assert b"pyport_ready" not in out, "ready was announced although Python did not start"
    assert b"a broken uuid module" in out, "the reason is logged through the protocol: %r" % out[-300:]


def test_exit_status_127_when_the_python_is_missing():
    env = dict(os.environ, PYPORT_PYTHON="/nonexistent/bin/python3")
    status, out, err = run_port(env=env)
    assert status == 127, (status, err[-2000:])
    assert "/nonexistent/bin/python3" in err, err
    assert out == b"", out[:200]


def test_spares_start_under_load_and_exit_when_idle(port_factory):
    p = port_factory(["--workers", "1", "--max-workers", "4", "--spare-idle-ms", "300"])
    assert p.stats()[A("workers")] == 1
    # Three requests that can only finish together (a barrier of three): the pool must grow.
    p.exec_ok(
        "import sys, threading, types\n"
        "m = types.ModuleType('pyport_test_spares')\n"
        "m.barrier = threading.Barrier(3)\n"
        "sys.modules['pyport_test_spares'] = m\n"
    )
    # Module calls from three processes: they use no namespace, so nobody gets a home thread
    # (a spare that is home to a process would never exit for being idle).
    ids = [p.call("pyport_test_spares", "barrier.wait", [30], owner=pid(400 + i)) for i in range(3)]
    assert sorted(p.ok(rid, timeout=60) for rid in ids) == [0, 1, 2]
    assert p.stats()[A("workers")] >= 3
    # Idle spares exit (after 300 ms here); the hot worker stays.
    wait_until(lambda: p.stats()[A("workers")] == 1, 10, "idle spare workers to exit")
    p.assert_serving()


def test_python_object_repr_is_cut(port):
    got = port.eval_ok("type('Big', (), {'__repr__': lambda self: 'y' * 10000})()")
    assert got[0] == "python_object" and got[1] == b"__main__.Big", got[:2]
    assert got[2].startswith(b"y" * 4000), got[2][:100]
    # PROTOCOL.md says "cut to 4096 bytes"; the port appends "..." after 4096 bytes (4099 in
    # all). Only the cut itself is pinned here.
    assert len(got[2]) < 4200, len(got[2])
    # A multi-byte character is never split by the cut.
    got = port.eval_ok("type('Wide', (), {'__repr__': lambda self: '\\u00e9' * 3000})()")
    assert len(got[2]) < 4200, len(got[2])
    got[2].decode("utf-8")
