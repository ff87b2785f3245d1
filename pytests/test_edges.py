"""The edges of the wire protocol's promises: defaults as the running port applies them, limits
exactly at the bound and one past it, the shortest and longest valid inputs."""

import os
import re
import struct
import time

from conftest import A, REPO, b2t, ref, t2b

PROTOCOL = os.path.join(REPO, "docs", "PROTOCOL.md")

# docs/PROTOCOL.md "Command line" flag -> the key of the stats map's `config` that reports it.
# (`--generation` is the stats map's own `generation`; `--node` and `--otp-release` come from
# the VM and have no default a user sets.)
FLAG_KEYS = {
    "--shm-size": "shared_dict_memory",
    "--workers": "workers",
    "--max-workers": "max_workers",
    "--spare-after-ms": "spare_after_ms",
    "--spare-idle-ms": "spare_idle_ms",
    "--max-frame-bytes": "max_frame_bytes",
    "--abandon-after-ms": "abandon_after_ms",
    "--max-abandoned": "max_abandoned_workers",
    "--gil-watchdog-ms": "gil_watchdog_ms",
    "--max-reply-bytes": "max_reply_bytes",
    "--thread-affinity": "thread_affinity",
    "--oom-score-adj": "oom_score_adj",
    "--max-memory-bytes": "max_memory_bytes",
    "--sd-decode-workers": "sd_decode_workers",
    "--none-as": "none_as",
    "--log-lines-per-sec": "log_lines_per_sec",
    "--callback-timeout-ms": "callback_timeout",
    "--max-threads": "max_threads",
    "--trace-latency": "trace_latency",
    "--worker-reads": "worker_reads",
    "--python-log-level": "python_log_level",
    "--python-log-format": "python_log_format",
}
# Identities of this port and its pool, not settings.
NOT_REPORTED = {"--generation", "--node", "--otp-release", "--shm-path", "--pool-generation"}


def documented_flag_defaults():
    """{flag: default text} from the "Command line" table of docs/PROTOCOL.md."""
    with open(PROTOCOL, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Command line") : text.index("Exit statuses")]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"`(--[a-z-]+)", cells[0]) if len(cells) >= 3 else None
        if m:
            out[m.group(1)] = cells[-1].strip("`")
    return out


def as_reported(flag, default):
    """What the stats map's `config` says for a flag at its documented default."""
    if flag == "--max-memory-bytes" and default == "0":
        return None  # 0: no limit, reported as `undefined`
    if default == "undefined":
        return None  # the harness reads the atom `undefined` as None
    if flag == "--trace-latency":
        return default == "1"
    if flag == "--python-log-format":
        return default.encode()  # a text: the harness reads binaries as bytes
    if default.split()[0].isdigit():  # "30 (WARNING)"
        return int(default.split()[0])
    return A(default)


def test_the_port_reports_its_documented_defaults(port):
    """Every flag of docs/PROTOCOL.md at its documented default, as the running port applies it
    (a port started with no flags), read from the stats map's `config`."""
    documented = documented_flag_defaults()
    assert set(documented) == set(FLAG_KEYS) | NOT_REPORTED, sorted(documented)
    config = port.stats()[A("config")]
    assert set(config) == set(FLAG_KEYS.values()), sorted(config)
    wrong = {
        flag: (documented[flag], config[key])
        for flag, key in FLAG_KEYS.items()
        if config[key] != as_reported(flag, documented[flag])
    }
    assert not wrong, "documented default != what the port applies: %r" % wrong


def test_config_reports_the_flags_given(port_factory):
    """The report is of what is in effect, not a copy of the defaults: each flag changes it,
    clamped values as clamped (sd-decode-workers 1 to 64, log-lines-per-sec at least 1)."""
    p = port_factory([
        "--workers", "2", "--max-workers", "1", "--callback-timeout-ms", "250",
        "--max-abandoned", "0", "--max-threads", "3", "--gil-watchdog-ms", "0",
        "--sd-decode-workers", "65", "--log-lines-per-sec", "0", "--thread-affinity", "none",
        "--none-as", "nil", "--max-memory-bytes", str(1 << 36), "--worker-reads", "never",
        "--shm-size", str(1 << 20),
    ])
    config = p.stats()[A("config")]
    expected = {
        "workers": 2, "max_workers": 2, "callback_timeout": 250, "max_abandoned_workers": 0,
        "max_threads": 3, "gil_watchdog_ms": A("infinity"), "sd_decode_workers": 64,
        "log_lines_per_sec": 1, "thread_affinity": A("none"), "none_as": A("nil"),
        "max_memory_bytes": 1 << 36, "worker_reads": A("never"), "shared_dict_memory": 1 << 20,
    }
    assert {k: config[k] for k in expected} == expected
    low = port_factory(["--sd-decode-workers", "0"]).stats()[A("config")]
    assert low["sd_decode_workers"] == 1


# --- lengths cut at a bound: exactly at it and one byte past -------------------------------


def test_repr_cut_exactly_past_4096_bytes(port):
    """PROTOCOL.md: a `repr` longer than 4096 bytes is cut after 4096 bytes, at a character
    boundary, and ends in `...`; one of exactly 4096 bytes is whole."""
    def repr_of(text_expr):
        got = port.eval_ok("type('R', (), {'__repr__': lambda self: %s})()" % text_expr)
        assert got[0] == "python_object", got[:2]
        return got[2]

    assert repr_of("'y' * 4096") == b"y" * 4096
    assert repr_of("'y' * 4097") == b"y" * 4096 + b"..."
    # a two-byte character across the cut is left out whole, never split
    assert repr_of("'y' * 4095 + '\\u00e9'") == b"y" * 4095 + b"..."
    assert repr_of("'y' * 4094 + '\\u00e9'") == b"y" * 4094 + "\u00e9".encode()


def stdout_line(port, n, end="\n"):
    """What arrives for one printed line of `n` bytes (a marker, then 'z's)."""
    marker = ("L%05d" if end else "P%05d") % n
    assert port.exec_ok("import sys\nsys.stdout.write(%r + 'z' * %d + %r)" % (marker, n - len(marker), end)) is None
    found = collect_logs_until(port, lambda lv, src, msg: src == "stdout" and msg.startswith(marker.encode()))
    assert len(found) == 1, found
    return found[0][2]


def collect_logs_until(port, pred, timeout=10):
    """The log lines that satisfy `pred`, once there is one (frames are read meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [log for log in port.logs if pred(*log)]
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("no such log line within %.1f s: %r" % (timeout, port.logs[-5:]))
        try:
            t = port.recv(0.05)  # logs are recorded; anything else is unexpected here
            raise AssertionError("unexpected frame %r" % (t,))
        except TimeoutError:
            pass


def test_stdout_line_cut_exactly_past_4096_bytes(port):
    """README: lines are cut at 4096 bytes: a line of exactly 4096 bytes arrives whole, one of
    4097 arrives within 4096 bytes, saying how much was cut; a line of any length is one log
    event (print writes its newline separately: a cut line's end must not become a line)."""
    whole = stdout_line(port, 4096)
    assert len(whole) == 4096 and whole.endswith(b"z"), (len(whole), whole[-30:])
    cut = stdout_line(port, 4097)
    assert len(cut) <= 4096, len(cut)
    assert cut.endswith(b"bytes cut]"), cut[-40:]
    assert cut_length(cut) == 4097
    # far longer than the pipe's buffer: still one line, cut once
    huge = stdout_line(port, 200000)
    assert len(huge) <= 4096 and cut_length(huge) == 200000, huge[-40:]
    # and nothing else came of them (no empty line after a cut one)
    stdout_line(port, 10)
    assert [len(m) for lv, src, m in port.logs if src == "stdout"] == [4096, len(cut), len(huge), 10]
    # Text without a newline is a line once output pauses: the same bound, whatever chunks
    # the pipe delivers it in (print's text and newline may come in one read or two).
    assert stdout_line(port, 4096, end="") == b"P04096" + b"z" * 4090
    assert cut_length(stdout_line(port, 4097, end="")) == 4097


def cut_length(msg):
    """The length of the line a cut message came from: what was kept plus what was cut."""
    n = int(re.search(rb"\[(\d+) bytes cut\]$", msg).group(1))
    return len(msg) - len(b"... [%d bytes cut]" % n) + n


def log_record_of(port, n):
    """The message of the pyport_log_record frame of a logging record of `n` bytes."""
    marker = "R%06d" % n
    rid = port.exec("import logging\nlogging.getLogger('edges').error(%r + 'r' * %d)" % (marker, n - len(marker)))
    record = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        t = port.next_frame(deadline - time.monotonic())
        if isinstance(t, tuple) and t[0] == "pyport_log_record" and t[-1].startswith(marker.encode()):
            record = t[-1]
        elif isinstance(t, tuple) and len(t) == 3 and t[0] == rid:
            assert t[1] == "ok", t
            break
    assert record is not None, "no log record before the reply"
    return record


def test_log_record_cut_exactly_past_64_kib(port):
    """PROTOCOL.md: a logging record's message is at most 64 KiB: one of exactly 65536 bytes
    arrives whole, one of 65537 arrives within 65536 bytes, saying how much was cut."""
    assert log_record_of(port, 65536) == b"R065536" + b"r" * (65536 - 7)
    cut = log_record_of(port, 65537)
    assert len(cut) <= 65536 and cut.endswith(b"bytes cut]"), (len(cut), cut[-40:])


def test_reply_exactly_at_and_one_past_max_reply_bytes(port_factory):
    """README: a reply frame over `max_reply_bytes` fails its own request with
    `{reply_too_large, Size, Max}`; a reply of exactly `Max` bytes is sent."""
    limit = 20000
    p = port_factory(["--max-reply-bytes", str(limit)])
    # The size of a reply holding n bytes, from a reply that is too large.
    big = 30000
    reason = p.err(p.eval("b'x' * %d" % big))
    assert reason[0] == "reply_too_large" and reason[2] == limit, reason
    overhead = reason[1] - big
    n = limit - overhead
    rid = p.eval("b'x' * %d" % n)
    assert p.ok(rid) == b"x" * n
    reason = p.err(p.eval("b'x' * %d" % (n + 1)))
    assert tuple(reason) == ("reply_too_large", limit + 1, limit), reason
    p.assert_serving()


def test_length_prefix_one_past_max_frame_bytes_exits(port_factory):
    """PROTOCOL.md: a length prefix over --max-frame-bytes exits with status 3, also one byte
    over (a frame of exactly the limit is served: test_framing's
    test_frame_at_max_frame_bytes_is_served)."""
    p = port_factory(["--max-frame-bytes", "4096"])
    p.assert_serving()
    p.send_raw(struct.pack(">I", 4097))
    assert p.wait_exit(5) == 3


# --- numbers at the ends of their range ------------------------------------------------------


def test_request_ids_from_1_to_2_63_minus_1(port):
    """PROTOCOL.md: `Id` is an integer from 1 to 2^63-1: the ends are served, 0 and 2^63 are
    bad requests answered with the id they carried."""
    for rid in (1, 2**63 - 1):
        assert port.ok(port.eval("7", rid=rid)) == 7
    for rid in (0, 2**63):
        port.send((A("eval"), rid, port.owner, "7", t2b({})))
        t = port.recv()
        assert t[0] in (rid, None) and t[1] == "error" and t[2][0] == "bad_request", t
    port.assert_serving()


def test_stream_window_from_1_to_2_20(port):
    """PROTOCOL.md: a stream's `Window` is 1 to 2^20: both ends start a stream that sends its
    items and ends, 0 and 2^20 + 1 are bad requests."""
    port.exec_ok("def three():\n    yield from (1, 2, 3)\n")

    def start(window):
        rid = port.new_id()
        key = t2b(ref(rid))
        port.send((A("stream_start"), rid, port.owner, "__main__", "three", t2b(([], {})), key,
                   port.owner, window))
        return rid, key

    for window in (1, 2**20):
        rid, key = start(window)
        sent, replied, ended = [], None, False
        deadline = time.monotonic() + 15
        while not (replied and ended and sent and sent[-1] == "done"):
            t = port.recv(deadline - time.monotonic())
            if t[0] == rid:
                replied = t
            elif t[0] == "pyport_stream_send":  # {pyport_stream_send, Ref, Pid, Message}
                sent.append(b2t(t[3])[2])
                if window == 1 and len(sent) < 4:
                    port.send((A("stream_ack"), key, 1))
            elif t[0] == "pyport_stream_end":  # {pyport_stream_end, Ref, Pid, Message}: the last
                ended = True
                if len(t) == 4:
                    sent.append(b2t(t[3])[2])
            else:
                raise AssertionError("unexpected frame %r" % (t,))
        assert replied[1] == "ok", replied
        assert sent == [(A("data"), 1), (A("data"), 2), (A("data"), 3), A("done")], (window, sent)
    for window in (0, 2**20 + 1):
        rid, _ = start(window)
        reason = port.err(rid)
        assert reason[0] == "bad_request" and b"window" in reason[1], reason
    port.assert_serving()


def test_latency_trace_keeps_the_last_4096_calls(port_factory):
    """PROTOCOL.md: with --trace-latency 1 a stats request reports the calls traced since the
    previous one, at most the last 4096: of 4097 calls one is dropped, and a second stats request
    reports none of them again."""
    p = port_factory(["--trace-latency", "1"])
    p.stats()  # forget the start-up's
    ids = [p.call("math", "sqrt", [2.0]) for _ in range(4097)]
    for rid in ids:
        p.ok(rid)
    calls = p.stats()[A("latency_trace")][A("calls")]
    traced = [c[0] for c in calls]
    # calls end in any order on several workers: one of them, an early one, is dropped
    assert len(traced) == 4096 and len(set(traced)) == 4096 and set(traced) <= set(ids), len(traced)
    assert p.stats()[A("latency_trace")][A("calls")] == []


def test_output_burst_is_exactly_twice_the_rate(port_factory):
    """README: output lines are limited to `log_lines_per_sec`, in bursts of twice that; what
    is suppressed is counted in a later warning. With a rate of 2, five lines written at once
    (one write, read in one go): the first 4 arrive, the fifth is counted."""
    p = port_factory(["--log-lines-per-sec", "2"])
    assert p.exec_ok("import sys\nsys.stdout.write(''.join('burst %d\\n' % i for i in range(5)))") is None
    warning = collect_logs_until(
        p, lambda lv, src, msg: src == "pyport" and b"suppressed" in msg and b"stdout" in msg)
    assert warning[0][2].startswith(b"1 lines of Python stdout suppressed"), warning
    lines = [m for lv, src, m in p.logs if src == "stdout"]
    assert lines == [b"burst %d" % i for i in range(4)], lines
