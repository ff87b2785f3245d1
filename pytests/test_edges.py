"""The edges of the wire protocol's promises: defaults as the running port applies them, limits
exactly at the bound and one past it, the shortest and longest valid inputs."""

import os
import re
import time

from conftest import A, REPO, t2b

PROTOCOL = os.path.join(REPO, "docs", "PROTOCOL.md")

# docs/PROTOCOL.md "Command line" flag -> the key of the stats map's `config` that reports it.
# (`--generation` is the stats map's own `generation`; `--node` and `--otp-release` come from
# the VM and have no default a user sets.)
FLAG_KEYS = {
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
}
NOT_REPORTED = {"--generation", "--node", "--otp-release"}


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
    if default.isdigit():
        return int(default)
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
    ])
    config = p.stats()[A("config")]
    expected = {
        "workers": 2, "max_workers": 2, "callback_timeout": 250, "max_abandoned_workers": 0,
        "max_threads": 3, "gil_watchdog_ms": A("infinity"), "sd_decode_workers": 64,
        "log_lines_per_sec": 1, "thread_affinity": A("none"), "none_as": A("nil"),
        "max_memory_bytes": 1 << 36, "worker_reads": A("never"),
    }
    assert {k: config[k] for k in expected} == expected
    low = port_factory(["--sd-decode-workers", "0"]).stats()[A("config")]
    assert low["sd_decode_workers"] == 1


# --- lengths cut at a bound: exactly at it and one byte past -------------------------------


def stdout_line(port, n):
    """What arrives for one printed line of `n` bytes (`n` - 6 'z' between markers)."""
    marker = "L%05d" % n
    assert port.exec_ok("print(%r + 'z' * %d)" % (marker, n - len(marker))) is None
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


def cut_length(msg):
    """The length of the line a cut message came from: what was kept plus what was cut."""
    n = int(re.search(rb"\[(\d+) bytes cut\]$", msg).group(1))
    return len(msg) - len(b"... [%d bytes cut]" % n) + n
