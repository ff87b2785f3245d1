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


def new_loop(exception_filter):
    """The port's loop. Errors raised in callbacks go to `exception_filter(context)`
    first: it returns True for those that must not be logged (the remains of a thread
    the port wrote off)."""
    loop = asyncio.SelectorEventLoop()

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
    """Runs the loop until `begin()`, asked before each callback, says that this thread
    no longer holds it; the callback then stays first in the queue for the next driver.
    `end()` follows every callback that ran."""
    take(loop)
    ready = loop._ready
    while True:
        if not begin():
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
            handle = ready.popleft()
            if handle._cancelled:
                continue
            if not begin():
                ready.appendleft(handle)
                return
            try:
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
