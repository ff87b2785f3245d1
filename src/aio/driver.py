"""pyport's asyncio driver: one event loop, run by whichever thread holds the baton.

The port awaits coroutines on one event loop. A thread that must wait outside Python
while it runs a task (a callback into Erlang, `erlang.call`) hands the loop to another
thread first, so the other coroutines go on; it takes the loop back, between two of the
loop's callbacks, when its wait is over. So the loop is never run by two threads at once,
and the loop's ready queue is run one callback at a time: the next driver continues
exactly where the last one stopped.

`drive` is asyncio's own iteration (timers, I/O, ready callbacks), asked before each
callback whether this thread still holds the loop. The loop's internals it uses are the
same in CPython 3.11 to 3.13.
"""

import asyncio
import heapq
import sys
import threading
from asyncio import events, tasks

# Longer waits are cut into pieces, as asyncio does.
_MAX_SELECT_TIMEOUT = 24 * 3600
# Rebuild the timer heap when over half of at least this many timers are cancelled.
_MIN_TIMERS_TO_PRUNE = 100


class Loop(asyncio.SelectorEventLoop):
    """A selector loop that wakes the thread running it when another thread schedules a
    callback: a coroutine's step that resumes on a thread that no longer runs the loop (a
    thread back from Erlang, the remains of one written off) may resolve a future or set
    an event, and the thread that runs the loop may be sleeping in `select`."""

    def call_soon(self, callback, *args, context=None):
        handle = super().call_soon(callback, *args, context=context)
        if self._thread_id != threading.get_ident():
            self._write_to_self()
        return handle

    def call_at(self, when, callback, *args, context=None):
        handle = super().call_at(when, callback, *args, context=context)
        if self._thread_id != threading.get_ident():
            self._write_to_self()
        return handle


def new_loop(exception_filter):
    """The port's loop. Errors raised in callbacks go to `exception_filter(context)`
    first: it returns True for those that must not be logged (the remains of a thread
    the port wrote off)."""
    loop = Loop()

    def handler(lp, context):
        if not exception_filter(context):
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return loop


def adopt(loop):
    """Makes the calling thread one that can run `loop` (once per thread): the thread's
    running loop and async generator hooks are thread-local."""
    events._set_running_loop(loop)
    sys.set_asyncgen_hooks(firstiter=loop._asyncgen_firstiter_hook,
                           finalizer=loop._asyncgen_finalizer_hook)


def take(loop):
    """The calling thread now holds the loop."""
    loop._thread_id = threading.get_ident()


def drive(loop, begin, end):
    """Runs the loop until `begin(more, due)`, asked before each callback, says that this
    thread no longer holds it. `more`: other callbacks are ready behind this one; `due`:
    when the next timer is due (loop time): the watcher counts both as work waiting for the
    loop. `end()` follows every callback that ran."""
    take(loop)
    ready = loop._ready
    while True:
        if not begin(False, None):
            return
        end()
        _prune_timers(loop)
        sched = loop._scheduled
        timeout = None
        if ready:
            timeout = 0
        elif sched:
            timeout = min(max(0, sched[0]._when - loop.time()), _MAX_SELECT_TIMEOUT)
        loop._process_events(loop._selector.select(timeout))
        end_time = loop.time() + loop._clock_resolution
        while sched and sched[0]._when < end_time:
            handle = heapq.heappop(sched)
            handle._scheduled = False
            ready.append(handle)
        # Only what is ready now: callbacks added meanwhile wait for the next poll.
        for _ in range(len(ready)):
            if not ready:
                break
            sched = loop._scheduled
            # Asked before the callback leaves the queue: a thread that no longer holds
            # the loop touches nothing of it.
            if not begin(len(ready) > 1, sched[0]._when if sched else None):
                return
            handle = ready.popleft()
            try:
                if not handle._cancelled:
                    handle._run()
            finally:
                end()
            handle = None
        # loop.stop() from user code would end run_forever; this loop runs on.
        loop._stopping = False


def _prune_timers(loop):
    sched = loop._scheduled
    if (len(sched) > _MIN_TIMERS_TO_PRUNE
            and loop._timer_cancelled_count / len(sched) > 0.5):
        kept = []
        for handle in sched:
            if handle._cancelled:
                handle._scheduled = False
            else:
                kept.append(handle)
        heapq.heapify(kept)
        loop._scheduled = kept
        loop._timer_cancelled_count = 0
    else:
        while sched and sched[0]._cancelled:
            loop._timer_cancelled_count -= 1
            heapq.heappop(sched)._scheduled = False


def current_task(loop):
    return tasks.current_task(loop)


def leave(loop, task):
    """The task's step goes on outside the loop (its thread waits for Erlang)."""
    tasks._leave_task(loop, task)


def enter(loop, task):
    """The task's step is back in the loop."""
    tasks._enter_task(loop, task)


def close_dropped(task, report):
    """Closes the coroutine of a task that ignored its cancellation (`GeneratorExit` at its
    `await`), as a callback of its own: its `finally` may block like any callback.
    `report(text)` is told when closing fails."""
    if task.done():
        return
    try:
        task.get_coro().close()
    except BaseException as e:  # noqa: BLE001 - whatever it raised is reported
        report("closing it raised %s: %s; it may run on" % (type(e).__name__, e))
    task.cancel()
