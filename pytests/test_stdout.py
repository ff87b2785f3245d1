"""Python writing to fd 1 (print, os.write, C code) must come back as pyport_log frames and never
corrupt the protocol stream. Every frame read here is decoded with erlang-py: a stray byte on the
protocol stream fails the test with PortStreamCorrupt."""

import re
import time

from conftest import A, Atom

LEVELS = {"info", "warning", "error"}


def collect_logs_until(port, pred, timeout=10):
    """Keep reading frames until some logged message satisfies `pred`."""
    deadline = time.monotonic() + timeout
    while True:
        for lv, src, msg in port.logs:
            if pred(lv, src, msg):
                return lv, src, msg
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no matching pyport_log within %.1f s; got %r" % (timeout, port.logs[-20:]))
        try:
            t = port.next_frame(min(left, 0.5))
        except TimeoutError:
            continue
        if port.is_log(t):
            port.logs.append(t[1:])
        elif port.is_ready(t):
            port.ready.append(t[1])
        else:
            assert isinstance(t, tuple) and len(t) == 3, t
            port.pending[t[0]] = t


def check_log_shapes(port):
    for lv, src, msg in port.logs:
        assert isinstance(lv, Atom) and lv in LEVELS, (lv, src, msg)
        assert isinstance(src, Atom) and src in ("stdout", "stderr", "pyport"), (lv, src, msg)
        assert isinstance(msg, bytes), (lv, src, msg)
        assert len(msg) <= 4096, "log message of %d bytes" % len(msg)
        assert b"\n" not in msg.rstrip(b"\n"), "log message spans several lines: %r" % msg[:200]


def test_print_becomes_log(port):
    assert port.exec_ok("print('hello from print')") is None
    port.assert_serving()
    lv, _, _ = collect_logs_until(port, lambda lv, src, msg: src == "stdout" and msg.rstrip(b"\n") == b"hello from print")
    assert lv == "info", lv  # PROTOCOL.md / README: stdout at info
    check_log_shapes(port)


def test_os_write_fd1_becomes_log(port):
    assert port.exec_ok("import os\nos.write(1, b'raw fd one\\n')") is None
    port.assert_serving()
    collect_logs_until(port, lambda lv, src, msg: src == "stdout" and b"raw fd one" in msg)


def test_c_level_write_fd1_becomes_log(port):
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.write(1, b'from libc write\\n', 16)\n"
        "libc.puts(b'from libc puts')\n"
        "libc.fflush(None)\n"
    )
    assert port.exec_ok(code) is None
    port.assert_serving()
    collect_logs_until(port, lambda lv, src, msg: src == "stdout" and b"from libc write" in msg)
    collect_logs_until(port, lambda lv, src, msg: src == "stdout" and b"from libc puts" in msg)


def test_stderr_becomes_log(port):
    assert port.exec_ok("import sys, os\nprint('to stderr', file=sys.stderr)\nos.write(2, b'fd two\\n')") is None
    port.assert_serving()
    lv1, _, _ = collect_logs_until(port, lambda lv, src, msg: src == "stderr" and b"to stderr" in msg)
    lv2, _, _ = collect_logs_until(port, lambda lv, src, msg: src == "stderr" and b"fd two" in msg)
    assert (lv1, lv2) == ("warning", "warning")  # stderr at warning


def test_fake_frame_on_stdout_does_not_desync(port):
    """Bytes that look like a frame header / ETF written to fd 1 stay log text."""
    code = (
        "import os, sys\n"
        "os.write(1, b'\\x00\\x00\\x00\\x05\\x83a\\x01\\x00\\x00')\n"
        "os.write(1, b'\\xff\\xff\\xff\\xf0')\n"
        "sys.stdout.write('\\x00\\x00\\x00\\x03abc\\n')\n"
        "sys.stdout.flush()\n"
    )
    assert port.exec_ok(code) is None
    for _ in range(3):
        port.assert_serving()


def test_partial_line_without_newline(port):
    assert port.exec_ok("print('no newline at end', end='')") is None
    port.assert_serving()
    assert port.exec_ok("print(' and the rest')") is None
    collect_logs_until(port, lambda lv, src, msg: src == "stdout" and b"and the rest" in msg)


def test_long_line_truncated(port):
    assert port.exec_ok("print('z' * 100000)") is None
    port.assert_serving()
    collect_logs_until(port, lambda lv, src, msg: src == "stdout" and msg.startswith(b"zzzz"))
    check_log_shapes(port)


def test_print_flood_5mb(port):
    """5 MB of prints: the call finishes (the drain never blocks Python), the stream stays in
    sync, the next call answers, and what was dropped by the rate limit is reported."""
    t0 = time.monotonic()
    n = 50_000
    rid = port.exec("for i in range(%d):\n    print('line %%06d ' %% i + 'x' * 88)\n" % n)
    assert port.ok(rid, timeout=60) is None
    port.assert_serving()
    check_log_shapes(port)
    # Never lost silently: every line either arrived or is counted in a "N lines ... suppressed"
    # message (which may come a little later; extra prints give a lazy reporter its chance).
    extra = 0
    deadline = time.monotonic() + 10
    while True:
        logged = sum(1 for _, src, msg in port.logs if src == "stdout" and msg.startswith(b"line "))
        counted = sum(suppressed_count(msg) for _, _, msg in port.logs)
        if logged + counted >= n:
            break
        assert time.monotonic() < deadline, (
            "%d of %d lines logged, %d counted as suppressed; last logs %r" % (logged, n, counted, port.logs[-5:])
        )
        port.exec_ok("print('after the flood')")
        extra += 1
        try:
            t = port.next_frame(0.3)
        except TimeoutError:
            continue
        if port.is_log(t):
            port.logs.append(t[1:])
    assert logged + counted <= n + extra, (logged, counted, n, extra)
    # The rate limit (100 lines/s, bursts of 200) is on: most of the flood was suppressed, and
    # the counts came in warnings from the port itself.
    elapsed = time.monotonic() - t0
    assert logged <= 200 + 100 * (elapsed + 1) + extra, (logged, elapsed)
    reports = [(lv, src) for lv, src, msg in port.logs if suppressed_count(msg)]
    assert reports and set(reports) == {("warning", "pyport")}, reports
    port.assert_serving()


def suppressed_count(msg):
    """N from a log message saying N lines were suppressed/dropped, else 0."""
    if msg.startswith(b"line ") or not re.search(rb"suppress|dropp|discard|skipp|lost|omit", msg, re.I):
        return 0
    m = re.search(rb"(\d+)", msg)
    return int(m.group(1)) if m else 0


def test_raw_write_flood_5mb(port):
    rid = port.exec("import os\nfor _ in range(50):\n    os.write(1, b'y' * 100000)\nos.write(1, b'\\n')\n")
    assert port.ok(rid, timeout=60) is None
    port.assert_serving()
    check_log_shapes(port)


def test_flood_from_thread_while_calls_run(port):
    """A background Python thread printing continuously does not stall or corrupt replies."""
    port.exec_ok(
        "import threading\n"
        "stop = threading.Event()\n"
        "def spam():\n"
        "    while not stop.is_set():\n"
        "        print('background ' * 20)\n"
        "t = threading.Thread(target=spam, daemon=True)\n"
        "t.start()\n"
    )
    for i in range(50):
        assert port.eval_ok("%d + 1" % i) == i + 1
    port.exec_ok("stop.set()\nt.join(10)\nassert not t.is_alive()")
    port.assert_serving()
