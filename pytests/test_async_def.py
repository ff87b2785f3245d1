"""`async def` at wire level: a call whose result is a coroutine is answered, once, with an
ordinary `{Id, ok, Payload}` or `{Id, error, Reason}` frame when the coroutine is done; a
cancelled one is answered `{Id, error, cancelled}` after its `finally` ran (docs/PROTOCOL.md)."""

import time

from conftest import A, wait_until

SRC = """
import asyncio
log = []

async def double(x):
    await asyncio.sleep(0.01)
    return x * 2

async def fail():
    await asyncio.sleep(0)
    raise KeyError('k')

async def guarded(tag):
    log.append(('started', tag))
    try:
        await asyncio.sleep(30)
        log.append(('completed', tag))
    finally:
        log.append(('finally', tag))
"""


def round_trip(port):
    """Every reply sent before this point has arrived (the stream is ordered)."""
    port.stats()


def test_async_call_reply_is_one_ordinary_ok_frame(port):
    port.exec_ok(SRC)
    rid = port.call("__main__", "double", [21])
    t = port.reply(rid)
    assert t[0] == rid and t[1] == A("ok") and isinstance(t[2], bytes), t
    assert port.result(port.eval("double(4)")) == ("ok", 8)
    round_trip(port)
    assert rid not in port.pending, "a second reply for the async call"
    assert port.stats()["async_tasks"] == 0


def test_async_raise_is_the_python_error_shape(port):
    port.exec_ok(SRC)
    reason = port.err(port.call("__main__", "fail"))
    assert reason[0] == A("python") and reason[1] == A("KeyError") and reason[2] == b"'k'", reason
    assert isinstance(reason[3], bytes) and b"in fail" in reason[3], reason


def test_cancelled_async_call_is_answered_cancelled_after_its_finally(port):
    port.exec_ok(SRC)
    rid = port.call("__main__", "guarded", ["c1"])
    wait_until(lambda: port.stats()["async_tasks"] == 1, 10, "the task to start")
    wait_until(lambda: port.eval_ok("log") == [(b"started", b"c1")], 10, "the coroutine to run")
    port.cancel(rid)
    assert port.err(rid) == A("cancelled")
    assert port.eval_ok("log") == [(b"started", b"c1"), (b"finally", b"c1")]
    assert port.stats()["async_tasks"] == 0
    # A cancel for a request already answered is harmless.
    port.cancel(rid)
    assert port.eval_ok("1") == 1


def test_cancel_while_the_call_that_makes_the_coroutine_runs(port):
    """The cancel arrives while a worker still runs the (synchronous) function that returns the
    coroutine: the reply is `cancelled` and the coroutine never completes."""
    port.exec_ok(SRC + "\nimport time\ndef slow_maker(tag):\n    time.sleep(0.3)\n    return guarded(tag)\n")
    rid = port.call("__main__", "slow_maker", ["c2"])
    time.sleep(0.1)
    port.cancel(rid)
    assert port.err(rid) == A("cancelled")
    wait_until(lambda: port.stats()["async_tasks"] == 0, 10, "no task left")
    assert (b"completed", b"c2") not in port.eval_ok("log")


def test_a_cancelled_task_is_never_answered_ok_even_if_it_swallows_the_cancel(port):
    port.exec_ok(
        "import asyncio\nswallowed = []\n"
        "async def stubborn():\n"
        "    swallowed.append(0)\n"
        "    try:\n        await asyncio.sleep(30)\n"
        "    except asyncio.CancelledError:\n        swallowed.append(1)\n        return 'swallowed'\n"
    )
    rid = port.call("__main__", "stubborn")
    wait_until(lambda: port.eval_ok("swallowed") == [0], 10, "the coroutine to reach its await")
    port.cancel(rid)
    assert port.err(rid) == A("cancelled")
    assert port.eval_ok("swallowed") == [0, 1]


def test_system_exit_in_a_coroutine_is_its_error_and_the_loop_runs_on(port):
    port.exec_ok("import asyncio\nasync def leave():\n    await asyncio.sleep(0)\n    raise SystemExit(3)\n"
                 "async def stop_loop():\n    asyncio.get_running_loop().stop()\n    await asyncio.sleep(0.01)\n    return 'still here'\n")
    reason = port.err(port.call("__main__", "leave"))
    assert reason[0] == A("python") and reason[1] == A("SystemExit") and reason[2] == b"3", reason
    assert port.ok(port.call("__main__", "stop_loop")) == b"still here"
    assert port.ok(port.eval("stop_loop()")) == b"still here"
