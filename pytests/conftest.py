"""Test harness for the pyport port program, driven directly over its pipes.

The wire protocol (docs/PROTOCOL.md) is spoken here with `erlang-py` (PyPI), a codec we did not
write, so these tests check the binary against an independent implementation of the external term
format.  Only deliberately malformed frames are built by hand.

Conventions after decoding (see `norm`):
  * atoms become `Atom` (a `str` subclass), except true/false -> bool and undefined -> None;
  * binaries become `bytes`; lists become `list` (also when sent as STRING_EXT);
  * pids, references, ports and funs become `Opaque` (compared by their canonical encoding).
When encoding (see `enc`), `str` and `bytes` become binaries, `Atom` becomes an atom, None becomes
`undefined`.
Beware: Atom("a") == "a" (it is a str), so a dict literal holding both as keys merges them; build
such maps from erlang-py objects (OtpErlangAtom / OtpErlangBinary) instead.
"""

import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time

import erlang as etf  # erlang-py, NOT pyport's built-in module (that one exists only in the port)
import pytest

assert hasattr(etf, "OtpErlangPid"), "the `erlang` module here must be erlang-py"

# erlang-py decodes recursively (two Python frames per level); the nesting tests go ~1000 deep.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPORT_BIN = os.environ.get("PYPORT_BIN", os.path.join(REPO, "priv", "pyport"))

DEFAULT_TIMEOUT = 15.0


# --------------------------------------------------------------------------------------------
# Term helpers


class Atom(str):
    """A decoded (or to-be-encoded) Erlang atom."""

    __slots__ = ()

    def __repr__(self):
        return "Atom(%s)" % str.__repr__(self)


A = Atom


class Opaque:
    """A pid, reference, port or fun, compared by a canonical encoding."""

    __slots__ = ("obj", "key")

    def __init__(self, obj):
        self.obj = obj
        self.key = _canonical(obj)

    def __eq__(self, other):
        return isinstance(other, Opaque) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return "Opaque(%r)" % (self.obj,)


def _canonical(obj):
    # Re-encode the node atom as UTF-8 so ATOM_EXT / SMALL_ATOM_UTF8_EXT variants compare equal.
    node = getattr(obj, "node", None)
    if node is not None:
        name = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
        clone = object.__new__(type(obj))
        clone.__dict__.update(obj.__dict__)
        clone.node = etf.OtpErlangAtom(name)
        return type(obj).__name__, clone.binary()
    return type(obj).__name__, obj.binary()


class ImproperList:
    """A decoded improper list (elements..., tail)."""

    def __init__(self, items):
        self.items = items

    def __eq__(self, other):
        return isinstance(other, ImproperList) and self.items == other.items

    def __repr__(self):
        return "ImproperList(%r)" % (self.items,)


class Raw(etf.OtpErlangFunction):
    """Pre-encoded ETF bytes (without the 131 version byte) to embed inside an erlang-py term.

    erlang-py emits `OtpErlangFunction` values as tag + value verbatim, which lets a test place a
    deliberately malformed sub-term inside an otherwise well-formed one."""

    def __init__(self, data):
        super().__init__(data[0], bytes(data[1:]))


def pid(n=1, node="nonode@nohost", creation=1):
    """A fake Erlang pid (NEW_PID_EXT), like the owner pids the Erlang server sends."""
    return etf.OtpErlangPid(
        etf.OtpErlangAtom(node), struct.pack(">I", n), struct.pack(">I", 0), struct.pack(">I", creation)
    )


def ref(n=1, node="nonode@nohost"):
    return etf.OtpErlangReference(
        etf.OtpErlangAtom(node), struct.pack(">III", n, 7, 9), struct.pack(">I", 1)
    )


def port_term(n=1, node="nonode@nohost"):
    return etf.OtpErlangPort(etf.OtpErlangAtom(node), struct.pack(">I", n), struct.pack(">I", 1))


def export_fun(module="lists", function="map", arity=2):
    """fun Module:Function/Arity as EXPORT_EXT."""
    body = etf.OtpErlangAtom(module).binary() + etf.OtpErlangAtom(function).binary()
    body += bytes([97, arity])
    return etf.OtpErlangFunction(113, body)


def enc(t):
    """Convenient Python value -> erlang-py term (str/bytes -> binary, Atom -> atom)."""
    if t is None or isinstance(t, (bool, int, float)):
        return t
    if isinstance(t, Atom):
        return etf.OtpErlangAtom(str(t))
    if isinstance(t, str):
        return etf.OtpErlangBinary(t.encode("utf-8"))
    if isinstance(t, (bytes, bytearray)):
        return etf.OtpErlangBinary(bytes(t))
    if isinstance(t, list):
        return [enc(x) for x in t]
    if isinstance(t, tuple):
        return tuple(enc(x) for x in t)
    if isinstance(t, dict):
        return {enc(k): enc(v) for k, v in t.items()}
    if isinstance(t, Opaque):
        return t.obj
    if isinstance(t, ImproperList):
        return etf.OtpErlangList([enc(x) for x in t.items], improper=True)
    if isinstance(
        t,
        (
            etf.OtpErlangAtom,
            etf.OtpErlangBinary,
            etf.OtpErlangList,
            etf.OtpErlangPid,
            etf.OtpErlangPort,
            etf.OtpErlangReference,
            etf.OtpErlangFunction,
        ),
    ):
        return t
    raise TypeError("cannot encode %r" % (t,))


def t2b(t):
    """term_to_binary via erlang-py."""
    return etf.term_to_binary(enc(t))


def norm(t):
    """erlang-py decoded term -> plain Python values (see module docstring)."""
    if isinstance(t, etf.OtpErlangAtom):
        v = t.value
        if isinstance(v, bytes):
            v = v.decode("latin-1")
        return Atom(v)
    if isinstance(t, etf.OtpErlangBinary):
        if t.bits != 8:
            return t
        return t.value
    if isinstance(t, bytes):  # STRING_EXT: a list of small integers
        return list(t)
    if isinstance(t, list):
        return [norm(x) for x in t]
    if isinstance(t, tuple):
        return tuple(norm(x) for x in t)
    if isinstance(t, dict):
        return {_normkey(k): norm(v) for k, v in t.items()}
    if isinstance(t, etf.OtpErlangList):
        items = [norm(x) for x in t.value]
        return ImproperList(items) if t.improper else items
    if isinstance(
        t, (etf.OtpErlangPid, etf.OtpErlangReference, etf.OtpErlangPort, etf.OtpErlangFunction)
    ):
        return Opaque(t)
    return t


def _normkey(k):
    v = norm(k)
    if isinstance(v, list):
        return tuple(v)
    return v


def b2t(data):
    """binary_to_term via erlang-py, normalised."""
    return norm(etf.binary_to_term(bytes(data)))


def frame(body):
    return struct.pack(">I", len(body)) + body


def deep_list_bytes(depth):
    """ETF body (no version byte) of [[[...[]...]]] nested `depth` lists deep, built by hand
    (erlang-py would recurse once per level)."""
    return b"l\x00\x00\x00\x01" * depth + b"j" + b"j" * depth


# --------------------------------------------------------------------------------------------
# The port


# The owner of assert_serving's probe calls (see there).
PROBE_OWNER = pid(4242)


class PortClosed(Exception):
    pass


class PortStreamCorrupt(AssertionError):
    pass


class Port:
    """One pyport process, its own session and process group (as under `open_port`)."""

    def __init__(self, args=(), env=None, wait_ready=True):
        if not (os.path.isfile(PYPORT_BIN) and os.access(PYPORT_BIN, os.X_OK)):
            pytest.fail("PYPORT_BIN %s is not an executable file" % PYPORT_BIN)
        self.args = [str(a) for a in args]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [PYPORT_BIN] + self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
            start_new_session=True,
            env=env,
        )
        self.pgid = self.proc.pid
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._buf = bytearray()
        self.eof = False
        self.logs = []  # (level, source, message) in arrival order
        # (handle, key) or (handle,) of the pyport_sd_invalidate frames, each answered at once
        # with sd_invalidated as the Erlang side does (the change waits for that answer)
        self.invalidations = []
        self.answer_invalidations = True  # False: kept in unanswered_invalidations instead
        self.unanswered_invalidations = []
        self.callbacks = []  # (name, args) of the callbacks Python made, answered by recv
        self.callback_frames = []  # the pyport_callback frames themselves, in arrival order
        # name (bytes) -> fn(args, cb_id) returning ("ok", Term) or ("error", Term): a test's
        # own Erlang side for these names (see answer_callback)
        self.callback_answers = {}
        self.log_records = []
        self.ready = []  # pyport_ready maps
        self.frames_seen = []  # every decoded frame in arrival order (normalised)
        self.pending = {}  # Id -> reply frame not yet consumed
        self.unmatched = []  # {undefined, error, _} frames not yet consumed
        self._next_id = 1000
        self.owner = pid(1)
        if wait_ready:
            self.wait_ready()

    # ---- low level ------------------------------------------------------------------------

    def new_id(self):
        self._next_id += 1
        return self._next_id

    def write(self, data, deadline=None):
        """Write all bytes, draining the port's output meanwhile so neither side can block."""
        view = memoryview(bytes(data))
        deadline = deadline or (time.monotonic() + 60)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("port did not accept %d more bytes" % len(view))
            rl = [self._out] if not self.eof else []
            r, w, _ = select.select(rl, [self._in], [], left)
            if r:
                self._read_some()
            if w:
                try:
                    n = os.write(self._in, view[: 1 << 20])
                except BlockingIOError:
                    continue
                view = view[n:]

    def send_raw(self, data):
        self.write(data)

    def send_body(self, body):
        self.write(frame(body))

    def send(self, term):
        self.write(frame(t2b(term)))

    def _read_some(self):
        try:
            chunk = os.read(self._out, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            self.eof = True
        else:
            self._buf += chunk

    def _take_frame(self):
        if len(self._buf) < 4:
            return None
        (n,) = struct.unpack(">I", self._buf[:4])
        if n > 512 * 1024 * 1024:
            raise PortStreamCorrupt("port sent a length prefix of %d: %r" % (n, bytes(self._buf[:64])))
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        return body

    def next_frame(self, timeout=DEFAULT_TIMEOUT):
        """The next frame of any kind (logs included), decoded and normalised."""
        deadline = time.monotonic() + timeout
        while True:
            body = self._take_frame()
            if body is not None:
                try:
                    term = b2t(body)
                except Exception as e:  # noqa: BLE001
                    raise PortStreamCorrupt("port sent a frame that is not ETF (%s): %r" % (e, body[:200]))
                self.frames_seen.append(term)
                return term
            if self.eof:
                raise PortClosed(
                    "port closed its output (exit status %r); stderr: %s"
                    % (self.proc.poll(), self.stderr_text()[-2000:])
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the port within %.1f s" % timeout)
            r, _, _ = select.select([self._out], [], [], left)
            if r:
                self._read_some()

    @staticmethod
    def is_log(t):
        return isinstance(t, tuple) and len(t) == 4 and t[0] == "pyport_log" and isinstance(t[0], Atom)

    @staticmethod
    def is_log_record(t):
        return isinstance(t, tuple) and len(t) == 7 and t[0] == "pyport_log_record" and isinstance(t[0], Atom)

    @staticmethod
    def is_invalidation(t):
        return isinstance(t, tuple) and len(t) in (3, 4) and t[0] == "pyport_sd_invalidate" and isinstance(t[0], Atom)

    @staticmethod
    def is_ready(t):
        return isinstance(t, tuple) and len(t) == 2 and t[0] == "pyport_ready" and isinstance(t[0], Atom)

    def recv(self, timeout=DEFAULT_TIMEOUT):
        """The next frame that is neither pyport_log, pyport_ready nor a SharedDict cache
        invalidation (those are recorded)."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.next_frame(max(0.0, deadline - time.monotonic()))
            if self.is_log(t):
                self.logs.append(t[1:])
            elif self.is_log_record(t):
                self.log_records.append(t[1:])
            elif self.is_invalidation(t):
                self.invalidations.append(t[2:])
                if self.answer_invalidations:
                    self.send((A("sd_invalidated"), t[1]))
                else:
                    self.unanswered_invalidations.append(t[1])
            elif self.is_callback(t):
                self.answer_callback(t)
            elif self.is_ready(t):
                self.ready.append(t[1])
            else:
                return t

    @staticmethod
    def is_callback(t):
        return isinstance(t, tuple) and len(t) == 5 and t[0] == "pyport_callback" and isinstance(t[0], Atom)

    def answer_callback(self, t):
        """Answers Python's callbacks as an Erlang side with no registered function would:
        built-in questions get their negative answer, other names are unknown. A name in
        `callback_answers` is answered by the test's function instead (see `register`)."""
        _, cb_id, name, _args, _caller = t
        args = b2t(_args)
        self.callbacks.append((name, args))
        self.callback_frames.append(t)
        if name in self.callback_answers:
            status, value = self.callback_answers[name](args, cb_id)
            self.send((A("callback_reply"), cb_id, A(status), t2b(value)))
        elif name == b"$pyport_connected":
            self.send((A("callback_reply"), cb_id, A("ok"), t2b(False)))
        elif name == b"$pyport_whereis":
            self.send((A("callback_reply"), cb_id, A("ok"), t2b(A("undefined"))))
        else:
            self.send((A("callback_reply"), cb_id, A("error"), t2b((A("unknown_function"), name))))

    def register(self, name, answer):
        """Registers `answer(args, callback_id) -> (status, value)` as the Erlang function
        `name` (bytes): the port is told the names, as the Erlang side tells it."""
        self.callback_answers[name] = answer
        self.send((A("functions"), sorted(self.callback_answers)))

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.ready:
            t = self.next_frame(max(0.0, deadline - time.monotonic()))
            if self.is_log(t):
                self.logs.append(t[1:])
            elif self.is_ready(t):
                self.ready.append(t[1])
            else:
                raise AssertionError("frame before pyport_ready: %r" % (t,))
        return self.ready[0]

    def reply(self, rid, timeout=DEFAULT_TIMEOUT):
        """The reply frame {Id, ok|error, X} for request `rid` (others are kept for later)."""
        if rid in self.pending:
            return self.pending.pop(rid)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply to request %r within %.1f s" % (rid, timeout))
            t = self.recv(left)
            assert isinstance(t, tuple) and len(t) == 3, "unexpected frame %r" % (t,)
            if t[0] == rid:
                return t
            if t[0] is None:
                self.unmatched.append(t)
            else:
                assert t[0] not in self.pending, "two replies for request %r" % (t[0],)
                self.pending[t[0]] = t

    def result(self, rid, timeout=DEFAULT_TIMEOUT):
        """('ok', Value) with the payload decoded, or ('error', Reason)."""
        t = self.reply(rid, timeout)
        _, status, x = t
        if status == "ok":
            assert isinstance(x, bytes), "ok reply payload is not a binary: %r" % (t,)
            return "ok", b2t(x)
        if status == "cached":
            # A SharedDict get the VM may cache: {Handle, Key, Payload}.
            assert isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], bytes), "bad cached reply %r" % (t,)
            return "ok", b2t(x[2])
        assert status == "error", "bad reply status in %r" % (t,)
        return "error", x

    def ok(self, rid, timeout=DEFAULT_TIMEOUT):
        status, x = self.result(rid, timeout)
        if status != "ok":
            pytest.fail("request %r failed: %s" % (rid, describe_error(x)))
        return x

    def err(self, rid, timeout=DEFAULT_TIMEOUT):
        status, x = self.result(rid, timeout)
        assert status == "error", "request %r unexpectedly succeeded with %r" % (rid, x)
        return x

    # ---- requests -------------------------------------------------------------------------

    def call(self, module, function, args=(), kwargs=None, owner=None, rid=None):
        rid = rid or self.new_id()
        payload = t2b((list(args), dict(kwargs or {})))
        self.send((A("call"), rid, owner or self.owner, module, function, payload))
        return rid

    def eval(self, code, locals=None, owner=None, rid=None):
        rid = rid or self.new_id()
        self.send((A("eval"), rid, owner or self.owner, code, t2b(dict(locals or {}))))
        return rid

    def exec(self, code, locals=None, owner=None, rid=None):
        rid = rid or self.new_id()
        self.send((A("exec"), rid, owner or self.owner, code, t2b(dict(locals or {}))))
        return rid

    def startup(self, sys_path, code):
        rid = self.new_id()
        self.send((A("startup"), rid, list(sys_path), code))
        return rid

    def cancel(self, rid):
        self.send((A("cancel"), rid))

    def owner_down(self, owner):
        self.send((A("owner_down"), owner))

    def drop_owners(self, owners):
        """What the Erlang side's owner watcher sends once owners died: their dicts go."""
        return self.sd("sd_drop_owners", list(owners))

    def sd_check(self):
        """Every inconsistency the store's checker finds (an empty list: none)."""
        return self.sd("sd_check")

    def stats(self):
        rid = self.new_id()
        self.send((A("stats"), rid))
        return self.ok(rid)

    def sd_new(self, owner=None):
        rid = self.new_id()
        self.send((A("sd_new"), rid, owner or self.owner))
        return self.ok(rid)

    def sd(self, op, *args, timeout=DEFAULT_TIMEOUT):
        """Send {op, Id, Args...}; return ('ok', V) or ('error', R)."""
        rid = self.new_id()
        self.send(tuple([A(op), rid] + list(args)))
        return self.result(rid, timeout)

    def sd_get(self, h, key):
        return self.sd("sd_get", h, key)

    def sd_set(self, h, key, value):
        return self.sd("sd_set", h, key, t2b(value))

    def sd_del(self, h, key):
        return self.sd("sd_del", h, key)

    def sd_keys(self, h):
        return self.sd("sd_keys", h)

    def sd_destroy(self, h):
        return self.sd("sd_destroy", h)

    def sd_give_away(self, h, new_owner):
        return self.sd("sd_give_away", h, new_owner)

    # ---- conveniences ---------------------------------------------------------------------

    def eval_ok(self, code, owner=None, timeout=DEFAULT_TIMEOUT, **locals):
        return self.ok(self.eval(code, locals, owner=owner), timeout)

    def exec_ok(self, code, owner=None, timeout=DEFAULT_TIMEOUT, **locals):
        return self.ok(self.exec(code, locals, owner=owner), timeout)

    def eval_err(self, code, owner=None, timeout=DEFAULT_TIMEOUT, **locals):
        return self.err(self.eval(code, locals, owner=owner), timeout)

    def exec_err(self, code, owner=None, timeout=DEFAULT_TIMEOUT, **locals):
        return self.err(self.exec(code, locals, owner=owner), timeout)

    def assert_serving(self, timeout=DEFAULT_TIMEOUT):
        """A fresh call answers correctly, and its reply is the very next reply frame: nothing
        stray (a second reply to an earlier bad frame) is left in the stream. It comes from
        another process than the tests' default owner and uses no namespace, so it floats to
        any free worker instead of waiting behind the default owner's home thread."""
        rid = self.call("operator", "mul", [6, 7], owner=PROBE_OWNER)
        t = self.recv(timeout)
        assert t[0] == rid, "expected the reply to %r, got %r" % (rid, t)
        assert t[1] == "ok" and b2t(t[2]) == 42, t
        assert not self.pending and not self.unmatched, (self.pending, self.unmatched)

    # ---- lifecycle ------------------------------------------------------------------------

    def close_stdin(self):
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait_exit(self, timeout):
        """Wait for the process to exit while draining its output; returns the exit status or
        None if it is still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                return rc
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not self.eof:
                r, _, _ = select.select([self._out], [], [], min(left, 0.05))
                if r:
                    self._read_some()
            else:
                try:
                    return self.proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    return None

    def stderr_text(self):
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def shutdown(self):
        """Close stdin and wait (up to a generous 10 s) for the port to exit by itself, as it
        promises to on end of input; then kill whatever is left of its process group so that a
        failing test leaves nothing behind. Returns the exit status, or None if the port had to
        be killed."""
        self.close_stdin()
        rc = self.wait_exit(10)
        if rc is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        leftovers = group_members(self.pgid)
        deadline = time.monotonic() + 10
        while rc is not None and leftovers and time.monotonic() < deadline:
            select.select([], [], [], 0.02)  # the port's group kill is on its way
            leftovers = group_members(self.pgid)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.final_stderr = self.stderr_text()
        self.proc.stdout.close()
        self._stderr.close()
        self.leftovers = leftovers
        return rc


def group_members(pgid):
    """Live (non-zombie) processes whose process group is `pgid`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(name))
    return found


def describe_error(reason):
    if isinstance(reason, tuple) and len(reason) == 4 and reason[0] == "python":
        tb = reason[3].decode("utf-8", "replace") if isinstance(reason[3], bytes) else reason[3]
        return "python %s: %r\n%s" % (reason[1], reason[2], tb)
    return repr(reason)


def pid_alive(p):
    """True if process `p` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % p) as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_until(pred, timeout, what, poll=None):
    """Re-evaluate `pred` until it is truthy or `timeout` passes. `poll` (optional) is called
    between attempts and must itself block a little (e.g. a port round trip)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for: %s" % what)
        if poll is not None:
            poll()
        else:
            select.select([], [], [], 0.02)


# --------------------------------------------------------------------------------------------
# Session check: assertions must be on, here and in the port


def pytest_sessionstart(session):
    """With PYTHONOPTIMIZE (or -O) `__debug__` is false: every `assert` in the Python snippets
    the tests send to the port, and pytest's own asserts outside rewritten modules, silently
    pass. Such a run proves nothing, so it is refused."""
    if not __debug__ or sys.flags.optimize:
        pytest.exit("refusing to run: Python assertions are disabled here (PYTHONOPTIMIZE=%r)"
                    % os.environ.get("PYTHONOPTIMIZE"), returncode=4)
    if not (os.path.isfile(PYPORT_BIN) and os.access(PYPORT_BIN, os.X_OK)):
        return  # every test fails on its own with a clear message
    p = Port()
    try:
        debug = p.eval_ok("__debug__")
    finally:
        p.shutdown()
    if debug is not True:
        pytest.exit("refusing to run: assertions are disabled in the port's Python (__debug__ is %r, "
                    "PYTHONOPTIMIZE=%r)" % (debug, os.environ.get("PYTHONOPTIMIZE")), returncode=4)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def port_factory():
    """Start ports with custom arguments; all of them are shut down at teardown."""
    ports = []

    def start(args=(), **kw):
        p = Port(args, **kw)
        ports.append(p)
        return p

    yield start
    problems = []
    for p in ports:
        rc = p.shutdown()
        err = p.final_stderr
        if err:
            # Shown by pytest only when the test failed.
            print("--- pyport %s stderr ---\n%s" % (" ".join(p.args), err[-4000:]))
        # README: the port exits by itself on end of input, killing the processes Python
        # started (its process group). Both are checked before the cleanup kill.
        if rc is None:
            problems.append("port %s did not exit within 10 s of end of input" % " ".join(p.args))
        elif p.leftovers:
            problems.append("processes %r of the port's group outlived it" % p.leftovers)
    assert not problems, problems


@pytest.fixture
def port(port_factory):
    """A fresh port (default flags), ready, shut down at teardown."""
    return port_factory()


@pytest.fixture
def sd_handle(port):
    """A SharedDict handle owned by the port's default owner."""
    return port.sd_new()


def is_handle(h):
    return (
        isinstance(h, tuple)
        and len(h) == 4
        and h[0] == "$pyport_shared_dict"
        and isinstance(h[0], Atom)
        and isinstance(h[1], int)
        and isinstance(h[2], int)
        and isinstance(h[3], bytes)
    )
