"""Python calling Erlang, at wire level: the `pyport_callback` frames the port sends, the
`callback_reply` requests that answer them, `pyport_send` frames, and the Chain element of a
request made by a callback's Erlang process. The harness plays an Erlang side with no
registered functions unless a test puts answers in `port.callback_answers`."""

import pytest

from conftest import A, Atom, Opaque, b2t, pid

OUTCOME = """
import erlang

def outcome(fn, *args):
    try:
        return ('ok', fn(*args))
    except erlang.ErlangError as e:
        return ('ErlangError', e.class_, e.reason, e.stack)
    except erlang.UnknownFunction as e:
        return ('UnknownFunction', isinstance(e, LookupError), str(e))
    except BaseException as e:
        return (type(e).__name__, str(e))
"""


def test_unknown_name_raises_unknown_function(port):
    port.exec_ok(OUTCOME)
    r = port.eval_ok("outcome(erlang.call, 'nope', 1, 'two')")
    assert r[0] == b"UnknownFunction" and r[1] is True, r
    # the frame: {pyport_callback, Id, <<"nope">>, ArgsEtf, Caller}, Caller the owner
    frame = port.callback_frames[-1]
    assert frame[0] == "pyport_callback" and isinstance(frame[0], Atom)
    assert isinstance(frame[1], int)
    assert frame[2] == b"nope"
    assert b2t(frame[3]) == [1, b"two"]
    assert frame[4] == Opaque(port.owner)


def test_hasattr_follows_the_functions_frame(port):
    """`{functions, Names}` replaces the names the port knows: `hasattr`, `from erlang
    import` and `dir` follow each frame at once, without asking the Erlang side."""
    erl = "__import__('erlang')"
    assert port.eval_ok("hasattr(%s, 'f')" % erl) is False
    port.send((A("functions"), [b"f", b"g"]))
    assert port.eval_ok("hasattr(%s, 'f') and hasattr(%s, 'g')" % (erl, erl)) is True
    assert port.eval_ok("'g' in dir(%s)" % erl) is True
    port.send((A("functions"), [b"g"]))
    assert port.eval_ok("hasattr(%s, 'f')" % erl) is False
    port.exec_ok(OUTCOME)
    r = port.eval_ok("outcome(exec, 'from erlang import f', {})")
    assert r[0] == b"ImportError", r
    port.send((A("functions"), []))
    assert port.eval_ok("hasattr(%s, 'g')" % erl) is False
    assert port.eval_ok("hasattr(%s, '_private')" % erl) is False
    assert port.callbacks == [], "nothing was asked of the Erlang side"


def test_dollar_names_refused_by_call(port):
    port.exec_ok(OUTCOME)
    before = len(port.callbacks)
    r = port.eval_ok("outcome(erlang.call, '$pyport_whereis', 'pyport_server')")
    assert r[0] == b"ValueError" and b"reserved" in r[1], r
    assert len(port.callbacks) == before, "a $-name reached the Erlang side"


def test_answers_convert_and_errors_raise(port):
    port.register(b"echo", lambda args, _id: ("ok", {"args": args, "t": (1, 2**80)}))
    port.register(b"boom", lambda args, _id: ("error", ("throw", "oops", "[stack]")))
    port.exec_ok(OUTCOME)
    assert port.eval_ok("erlang.echo(1, 'x')") == {b"args": [1, b"x"], b"t": (1, 2**80)}
    assert port.eval_ok("type(erlang.call('echo')['t']).__name__") == b"tuple"
    r = port.eval_ok("outcome(erlang.call, 'boom')")
    assert r == (b"ErlangError", b"throw", b"oops", b"[stack]"), r


def test_self_is_the_owner_of_the_call(port):
    owner = pid(77)
    assert port.eval_ok("__import__('erlang').self()", owner=owner) == Opaque(owner)
    assert port.eval_ok("__import__('erlang').self()") == Opaque(port.owner)


def test_send_produces_a_pyport_send_frame(port_factory):
    # the port serves the node of the harness's pids: no connectivity question is asked
    port = port_factory(["--node", "nonode@nohost"])
    rid = port.exec("import erlang\nerlang.send(erlang.self(), (1, 'two', b'3', [None]))")
    t = port.recv()
    assert len(t) == 3 and t[0] == "pyport_send" and isinstance(t[0], Atom), t
    assert t[1] == Opaque(port.owner)
    assert isinstance(t[2], bytes)
    assert b2t(t[2]) == (1, b"two", b"3", [None])  # the harness reads `undefined` as None
    assert port.ok(rid) is None


def test_send_waits_for_deliveries_past_1024_undelivered(port_factory):
    """Python may have 1024 erlang.send messages that the VM has not reported delivered
    (`{sent, N, Bytes}`); the 1025th waits until a report makes room, and
    `{sent, reset}` settles everything."""
    port = port_factory(["--node", "nonode@nohost"])
    rid = port.exec("import erlang\nfor i in range(1030):\n    erlang.send(erlang.self(), i)")
    sends = [port.recv() for _ in range(1024)]
    assert [b2t(t[2]) for t in sends] == list(range(1024))
    with pytest.raises(TimeoutError):
        port.recv(timeout=0.5)  # the 1025th waits
    # Two delivered: exactly two more go, in order.
    size = sum(len(t[2]) for t in sends[:2])
    port.send((A("sent"), 2, size))
    assert [b2t(port.recv()[2]) for _ in range(2)] == [1024, 1025]
    with pytest.raises(TimeoutError):
        port.recv(timeout=0.5)
    port.send((A("sent"), A("reset")))
    assert [b2t(port.recv()[2]) for _ in range(4)] == [1026, 1027, 1028, 1029]
    assert port.ok(rid) is None


def test_send_to_a_node_not_connected_raises_value_error(port_factory):
    port = port_factory(["--node", "pyport_ct@localhost"])
    port.exec_ok(OUTCOME)
    r = port.eval_ok("outcome(erlang.send, p, 1)", p=pid(5, node="elsewhere@nohost"))
    assert r[0] == b"ValueError", r
    assert port.callbacks[-1][0] == b"$pyport_connected"
    assert not any(f[0] == "pyport_send" for f in port.frames_seen if isinstance(f, tuple) and f)


def test_chain_request_runs_on_the_waiting_thread(port_factory):
    """A request carrying a callback's id as trailing Chain element runs on the thread that
    waits for that callback: with one worker and no room for a second, five levels of
    Python -> Erlang -> Python finish."""
    port = port_factory(["--workers", "1", "--max-workers", "1"])
    port.exec_ok(
        "import erlang, threading\n"
        "def up(n):\n"
        "    if n == 0:\n"
        "        return [threading.get_ident()]\n"
        "    return [threading.get_ident()] + erlang.down(n)\n"
    )

    def down(args, cb_id):
        (n,) = args
        rid = port.new_id()
        payload = b"\x83" + bytes(port_payload([n - 1]))
        port.send((A("call"), rid, port.owner, "__main__", "up", payload, cb_id))
        return ("ok", port.ok(rid))

    port.register(b"down", down)
    idents = port.ok(port.call("__main__", "up", [5]))
    assert len(idents) == 6 and len(set(idents)) == 1, idents


def port_payload(args):
    """The ETF of ({Args, #{}}) without the version byte, as conftest's Port.call builds it."""
    from conftest import t2b

    return t2b((list(args), {}))[1:]
