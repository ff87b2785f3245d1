"""Hang isolation at the wire: the reader answers heartbeats without the GIL, the GIL watchdog
ends a port whose cancellation cannot get the GIL, forked children never hold the protocol, a
killed port takes its process group with it, a reply over the limit fails its own request, and
every atom the port can send exists on the Erlang side (frames are decoded with `[safe]`)."""

import os
import pathlib
import re
import signal

import pytest

from conftest import A, PortClosed, pid, pid_alive, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A loop in C that holds the GIL for minutes and never checks for async exceptions.
GIL_HOG = "sum(range(10**11))"


class GilHolder:
    """An eval that holds the GIL in C, in read(2) on a FIFO through ctypes.PyDLL (which keeps
    the GIL), until `release()` writes the byte it waits for; it then evaluates `then` (42 by
    default). It holds the GIL exactly as long as the test needs, however busy the machine (a
    `sum(range(N))` may end before the test has done what must happen while it runs)."""

    def __init__(self, port, tmp_path, then="42"):
        self.fifo = str(tmp_path / "gil_holder")
        os.mkfifo(self.fifo)
        # Held open until the holder is done: a FIFO that nobody has open drops what was
        # written to it, and the port may open it only after `release()` wrote its byte.
        self.fd = os.open(self.fifo, os.O_RDWR)
        self.rid = port.eval(
            "__import__('ctypes').PyDLL(None).read(__import__('os').open(%r, __import__('os').O_RDWR), "
            "__import__('ctypes').create_string_buffer(1), 1) and (%s)" % (self.fifo, then)
        )

    def release(self):
        os.write(self.fd, b"x")

    def close(self):
        os.close(self.fd)


def read_to_end(port, timeout=10):
    """Reads (and records) frames until end of output; fails if none comes within `timeout`."""
    with pytest.raises(PortClosed):
        while True:
            port.recv(timeout=timeout)


def test_heartbeat_is_answered_while_python_holds_the_gil(port, tmp_path):
    holder = GilHolder(port, tmp_path)
    wait_until(lambda: port.stats()["busy_workers"] == 1, 10, "the GIL holder is running")
    port.send((A("heartbeat"), 77))
    t = port.recv(timeout=10)
    assert t == (A("pyport_heartbeat"), 77), "the heartbeat must overtake the GIL-bound reply: %r" % (t,)
    holder.release()
    assert port.ok(holder.rid, timeout=60) == 42
    holder.close()


def test_reader_work_needs_no_gil(port, tmp_path):
    """Stats, SharedDict bookkeeping and owner-down cleanup are answered while Python holds the
    GIL: none of them waits behind the holder's reply."""
    other = pid(9)
    port.eval_ok("1", owner=other)  # gives `other` a namespace
    h = port.sd_new()
    holder = GilHolder(port, tmp_path)
    wait_until(lambda: port.stats()["busy_workers"] == 1, 10, "the GIL holder is running")
    port.owner_down(other)
    assert port.stats()["namespaces"] == 1  # only the default owner's is left
    assert port.sd_keys(h) == ("ok", [])
    assert port.sd_destroy(h) == ("ok", A("ok"))
    assert holder.rid not in port.pending, "the GIL-bound reply came first"
    holder.release()
    assert port.ok(holder.rid, timeout=60) == 42
    holder.close()


def test_watchdog_ends_a_port_whose_cancellation_cannot_get_the_gil(port_factory):
    port = port_factory(["--gil-watchdog-ms", "300"])
    rid = port.eval(GIL_HOG)
    wait_until(lambda: port.stats()["busy_workers"] == 1, 10, "the loop is running")
    port.cancel(rid)
    assert port.wait_exit(30) == 7
    read_to_end(port)  # the log frames it sent before exiting
    text = b"\n".join(m for (_level, _source, m) in port.logs)
    assert b"GIL watchdog" in text, port.logs
    assert GIL_HOG.encode() in text and b"CPU" in text, port.logs


def test_watchdog_off_keeps_waiting(port_factory, tmp_path):
    port = port_factory(["--gil-watchdog-ms", "0"])
    # Once released, Python code that runs until its cancellation lands (never by itself).
    holder = GilHolder(port, tmp_path, then="[None for _ in iter(int, 1)]")
    wait_until(lambda: port.stats()["busy_workers"] == 1, 10, "the GIL holder is running")
    port.cancel(holder.rid)
    # With the watchdog off, a cancellation that cannot get the GIL waits: the port lives
    # (the default 5 s watchdog would have ended it well within this wait for busy workers)
    # and answers what needs no GIL.
    wait_until(lambda: port.stats()["busy_workers"] == 1 and port.proc.poll() is None, 10, "the port waits")
    assert holder.rid not in port.pending
    # The cancellation lands once the holder lets go of the GIL, and the port is still there.
    holder.release()
    assert port.err(holder.rid, timeout=60) == A("cancelled")
    holder.close()
    port.assert_serving()


def test_forked_children_do_not_hold_the_protocol(port):
    port.exec_ok(
        "import os, time\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    time.sleep(600)\n"
    )
    child = port.eval_ok("child")
    assert pid_alive(child)
    os.kill(port.proc.pid, signal.SIGKILL)
    # Only the dead port held the pipe: end of output comes at once, not when the child exits
    # (a TimeoutError here means something else still holds the protocol pipe).
    read_to_end(port)
    wait_until(lambda: not pid_alive(child), 10, "the reaper killed the forked child")


def test_forked_child_returning_into_the_port_exits(port):
    # The child's copy of the request returns into pyport's worker loop: it must not answer.
    rid = port.exec("import os\nforked = os.fork()\n")
    assert port.ok(rid) is None
    port.assert_serving()
    assert port.eval_ok("os.waitpid(forked, 0)[1]") == 0


def test_reply_over_the_limit_fails_only_its_request(port_factory):
    port = port_factory(["--max-reply-bytes", str(1 << 20)])
    slow = port.eval("__import__('time').sleep(0.3) or 'fine'")
    big = port.eval("b'x' * 2_000_000")
    reason = port.err(big)
    assert reason[0] == "reply_too_large" and reason[1] > 2_000_000 and reason[2] == 1 << 20, reason
    assert port.ok(slow) == b"fine"
    port.assert_serving()


def test_give_away_with_a_caller_checks_the_owner(port):
    h = port.sd_new()
    stranger, heir = pid(5), pid(6)
    assert port.sd("sd_give_away", h, heir, stranger) == ("error", A("not_owner"))
    assert port.sd("sd_give_away", h, heir, port.owner) == ("ok", A("ok"))
    assert port.sd("sd_give_away", h, stranger, port.owner) == ("error", A("not_owner"))


def test_ready_frame_lists_the_builtin_exceptions(port):
    names = port.ready[0]["builtin_exceptions"]
    assert b"ValueError" in names and b"BaseException" in names and b"Warning" in names
    assert all(re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", n) for n in names), names
    assert b"object" not in names and b"int" not in names
    # Aliases are listed by the class's own name: IOError is OSError.
    assert b"OSError" in names and b"IOError" not in names and len(set(names)) == len(names)


def product_code(text):
    """A Rust file without its test code: a declaration of a test module kept in its own file
    (`#[cfg(test)] mod tests;`, read or skipped on its own) is dropped, and an inline test
    module (`#[cfg(test)] mod tests { ... }`, written last) ends the product code. Other
    `#[cfg(test)]` items stay: reading them too only makes the check stricter."""
    text = re.sub(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))? )?mod \w+;", "", text)
    return re.split(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))? )?mod \w+ \{", text)[0]


def test_every_atom_the_port_sends_exists_on_the_erlang_side():
    """Frames are decoded with binary_to_term(B, [safe]), which refuses atoms the VM does not
    know: each atom literal of the port's product code must be in pyport_frames:port_atoms/0."""
    erl = (ROOT / "erl_src" / "pyport_frames.erl").read_text()
    body = erl[erl.index("\nport_atoms() ->"):]
    body = body[: body.index("].") + 1]
    known = set(re.findall(r"'([^']+)'|([a-z][a-z0-9_]*)", body))
    known = {a or b for a, b in known}
    sent = set()
    for path in sorted((ROOT / "src").rglob("*.rs")):
        if "tests" in path.relative_to(ROOT / "src").parts or path.name == "tests.rs":
            continue
        code = product_code(path.read_text())
        sent |= set(re.findall(r'(?:\batom|put_atom)\((?:&mut out, |out, )?"([^"]+)"', code))
        # log levels and sources: .log("warning", "pyport", ..), Drain::new("info", "stdout", ..)
        for pair in re.findall(r'(?:\.log|Drain::new)\("([a-z]+)", "([a-z]+)"', code):
            sent |= set(pair)
        # the stats map's keys: ("dicts", reg.dicts as u64)
        sent |= set(re.findall(r'\("([a-z_]+)", [a-z]+\.[a-z_]+ as u64\)', code))
        sent |= set(re.findall(r'\("([a-z_]+)", pool\.threads', code))
        # the settings the stats map's config reports: ("workers", Int(..)), Setting::Atom("auto")
        for body in re.findall(r"fn report\(&self\)[^{]*\{(.*?)\n    \}\n", code, re.S):
            sent |= set(re.findall(r'\("([a-z_]+)", ', body))
        sent |= set(re.findall(r'Atom\("([a-z_]+)"\)', code))
        # the latency trace's stage names: pub const STAGES: [&str; 6] = ["route_ns", ...]
        for names in re.findall(r"const STAGES: \[&str; \d+\] = \[([^\]]*)\]", code):
            sent |= set(re.findall(r'"([a-z_]+)"', names))
    assert len(sent) > 20, sent
    missing = sorted(sent - known)
    assert not missing, "atoms the port sends that Erlang may not know: %s" % missing
