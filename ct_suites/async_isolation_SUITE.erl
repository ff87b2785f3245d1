%% `async def' under the promise that nothing Python does hangs pyport for good
%% (README "async def" and the failure table): the event loop's threads are
%% watched like workers.
%%
%% - A coroutine that holds the GIL in C after its caller gave up fires the GIL
%%   watchdog (exit 7, the coroutine named in the log); the next call is served.
%% - A coroutine that blocks the loop without the GIL (time.sleep) while other
%%   coroutines wait is written off after abandon_after_ms: its caller gets
%%   `cancelled', the other coroutines go on, and the write-off counts toward
%%   max_abandoned_workers.
%% - erlang.call inside a coroutine waits without blocking the other coroutines;
%%   the caller's timeout ends the wait and kills the callback's process.
%% - erlang.self() is the caller inside coroutines and the tasks they create.
%% - A task that swallows its cancellation is dropped from async_tasks after a
%%   grace period (abandon_after_ms), logged, and its coroutine is closed.
-module(async_isolation_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([gil_holding_coroutine_fires_the_watchdog/1,
         blocking_coroutine_is_written_off/1,
         loop_write_offs_count_toward_the_limit/1,
         callbacks_from_coroutines_run_side_by_side/1,
         callback_wait_ends_with_the_callers_timeout/1,
         callback_in_a_coroutine_nests_python_calls/1,
         self_is_the_caller_in_coroutines_and_their_tasks/1,
         swallowed_cancellation_is_dropped_after_grace/1,
         pure_python_spinning_coroutine_is_written_off/1,
         work_after_a_callback_is_left_alone/1,
         nested_call_on_a_loop_thread_is_interrupted/1,
         callbacks_at_max_threads_are_answered/1,
         timers_due_behind_a_blocked_loop_go_on/1,
         wakeups_from_a_written_off_thread_are_not_lost/1,
         dropped_task_with_a_blocking_finally_loses_nothing/1]).

-import(pyport_ct_lib, [stat/1, now_ms/0, wait_until/3, has/2]).

-define(LIVENESS_MS, 15000).

-define(MODULE_SRC, <<"
import asyncio, time, erlang
events = []

async def hog():
    return sum(range(10**13))

async def blocker(tag):
    events.append(('started', tag))
    try:
        while True:
            time.sleep(0.05)
    finally:
        events.append(('finally', tag))

async def sleeper(seconds):
    time.sleep(seconds)
    return 'slept'

async def spinner(tag):
    events.append(('started', tag))
    try:
        while True:
            pass
    finally:
        events.append(('finally', tag))

async def quick(x):
    await asyncio.sleep(0)
    return x

async def nap(seconds, value):
    await asyncio.sleep(seconds)
    return value

async def via_erlang(name, arg):
    await asyncio.sleep(0)
    return erlang.call(name, arg)

async def who():
    await asyncio.sleep(0)
    return erlang.self()

async def who_in_a_task():
    async def inner():
        await asyncio.sleep(0)
        return erlang.self()
    return await asyncio.get_running_loop().create_task(inner())

def who_in_a_gathered_pair():
    async def inner():
        await asyncio.sleep(0)
        return erlang.self()
    async def both():
        return await asyncio.gather(inner(), inner())
    return both()

async def call_then_sleep(name, seconds):
    await asyncio.sleep(0)
    erlang.call(name, 1)
    time.sleep(seconds)
    return 'done'

async def call_then_spin(name, seconds):
    await asyncio.sleep(0)
    erlang.call(name, 1)
    t = time.monotonic()
    while time.monotonic() - t < seconds:
        pass
    return 'done'

def spin_forever(tag):
    events.append(('started', tag))
    try:
        while True:
            pass
    finally:
        events.append(('finally', tag))

ev = None
async def make_event():
    global ev
    ev = asyncio.Event()
    return True

async def wait_event():
    await ev.wait()
    return 'woke'

async def blocker_then_set(seconds):
    events.append(('started', 'bs'))
    try:
        time.sleep(seconds)
    finally:
        ev.set()
        events.append(('finally', 'bs'))

async def stubborn_blocking_finally():
    events.append(('started', 'sbf'))
    try:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                events.append(('swallowed', 'sbf'))
    finally:
        events.append(('closing', 'sbf'))
        time.sleep(3600)

laps = {}
async def stubborn(tag):
    laps[tag] = 0
    while True:
        try:
            await asyncio.sleep(0.01)
            laps[tag] += 1
        except asyncio.CancelledError:
            events.append(('swallowed', tag))

def seen(tag):
    return [kind for kind, t in events if t == tag]
">>).

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [gil_holding_coroutine_fires_the_watchdog,
     blocking_coroutine_is_written_off,
     loop_write_offs_count_toward_the_limit,
     callbacks_from_coroutines_run_side_by_side,
     callback_wait_ends_with_the_callers_timeout,
     callback_in_a_coroutine_nests_python_calls,
     self_is_the_caller_in_coroutines_and_their_tasks,
     swallowed_cancellation_is_dropped_after_grace,
     pure_python_spinning_coroutine_is_written_off,
     work_after_a_callback_is_left_alone,
     nested_call_on_a_loop_thread_is_interrupted,
     callbacks_at_max_threads_are_answered,
     timers_due_behind_a_blocked_loop_go_on,
     wakeups_from_a_written_off_thread_are_not_lost,
     dropped_task_with_a_blocking_finally_loses_nothing].

init_per_suite(Config) ->
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

case_env(gil_holding_coroutine_fires_the_watchdog) -> [{gil_watchdog_ms, 1000}];
case_env(loop_write_offs_count_toward_the_limit) ->
    [{abandon_after_ms, 300}, {max_abandoned_workers, 1}];
case_env(callbacks_at_max_threads_are_answered) ->
    [{abandon_after_ms, 500}, {workers, 1}, {max_threads, 3}];
case_env(_) -> [{abandon_after_ms, 500}].

init_per_testcase(Case, Config) ->
    Env = case_env(Case),
    Saved = pyport_ct_lib:save_env([K || {K, _} <- Env]),
    ok = pyport_ct_lib:stop_app(),
    [ok = application:set_env(pyport, K, V) || {K, V} <- Env],
    _ = pyport_ct_lib:start_app(),
    ok = load_module(),
    [{saved_env, Saved} | Config].

end_per_testcase(_Case, Config) ->
    _ = logger:remove_handler(async_isolation_capture),
    _ = [py:unregister_function(N) || N <- [gate, echo, nested, slow]],
    ok = pyport_ct_lib:stop_app(),
    pyport_ct_lib:restore_env(?config(saved_env, Config)).

load_module() ->
    py:exec(<<"import sys, types\n"
              "if 'aiso' not in sys.modules:\n"
              "    m = types.ModuleType('aiso')\n"
              "    exec(src, m.__dict__)\n"
              "    sys.modules['aiso'] = m\n">>, #{src => ?MODULE_SRC}).

%%--------------------------------------------------------------------
%% The GIL watchdog

%% `sum(range(10**13))' in an async def holds the GIL in C on the loop's
%% thread. Once its caller has given up, the watchdog ends the port (status
%% 7) and the log names the coroutine; every later call is served by the new
%% port. (Before: the loop was outside the watchdog and the port stayed wedged.)
gil_holding_coroutine_fires_the_watchdog(_Config) ->
    pyport_ct_lib:capture_logs(async_isolation_capture),
    {error, timeout} = py:call(aiso, hog, [], #{}, 1000),
    wait_answering(),
    #{last_exit := {exit_status, 7}} = pyport_ct_lib:stats(),
    Logs = pyport_ct_lib:logged(),
    ?assert(lists:any(fun(L) -> has(L, <<"GIL watchdog">>) end, Logs), Logs),
    ?assert(lists:any(fun(L) -> has(L, <<"aiso.hog">>) end, Logs), Logs),
    ok = load_module(),
    {ok, 5} = py:call(aiso, quick, [5], #{}, ?LIVENESS_MS).

%%--------------------------------------------------------------------
%% Write-offs of a blocked loop

%% A coroutine blocks the loop in time.sleep (without the GIL), for ever. An
%% async call of another process waits for the loop: after abandon_after_ms
%% the blocked thread is written off and a fresh one runs the loop, so the
%% other call is answered; the blocker's caller gets `cancelled', and
%% CallCancelled reaches the blocker when time.sleep returns (its finally runs).
%% (Before: every async def of every process waited until the port restarted.)
blocking_coroutine_is_written_off(_Config) ->
    pyport_ct_lib:capture_logs(async_isolation_capture),
    Self = self(),
    Blocker = spawn_link(fun() -> Self ! {blocker, py:call(aiso, blocker, [<<"b">>], #{}, infinity)} end),
    wait_seen(<<"b">>, [<<"started">>]),
    %% A coroutine already waiting on the loop (asyncio.sleep) and a new one.
    Napper = spawn_link(fun() -> Self ! {napper, py:call(aiso, nap, [0.01, nap], #{}, ?LIVENESS_MS)} end),
    {ok, 7} = py:call(aiso, quick, [7], #{}, ?LIVENESS_MS),
    receive {napper, R} -> {ok, <<"nap">>} = R after ?LIVENESS_MS -> ct:fail(napper_not_answered) end,
    receive {blocker, B} -> {error, cancelled} = B after ?LIVENESS_MS -> ct:fail(blocker_not_answered) end,
    wait_seen(<<"b">>, [<<"started">>, <<"finally">>]),
    %% The written-off thread came back (CallCancelled ended the blocker): nothing
    %% stays counted, and the port never restarted.
    wait_until(fun() -> stat(abandoned_workers) =:= 0 andalso stat(async_tasks) =:= 0 end,
               ?LIVENESS_MS, nothing_left_written_off),
    #{restarts := 0} = pyport_ct_lib:stats(),
    Logs = pyport_ct_lib:logged(),
    ?assert(lists:any(fun(L) -> has(L, <<"aiso.blocker">>) andalso has(L, <<"written off">>) end, Logs), Logs),
    unlink(Blocker), unlink(Napper),
    ok.

%% A loop blocked by a coroutine that never returns to Python (one long
%% time.sleep) is written off once and stays counted in abandoned_workers;
%% with max_abandoned_workers 1 the port lives on at one write-off and
%% restarts (status 6) at the second: one past the limit.
loop_write_offs_count_toward_the_limit(_Config) ->
    Self = self(),
    spawn(fun() -> Self ! {first, py:call(aiso, sleeper, [3600], #{}, infinity)} end),
    wait_until(fun() -> stat(async_tasks) =:= 1 end, ?LIVENESS_MS, first_sleeper_running),
    %% Another process's coroutine needs the loop: the first write-off.
    {ok, 1} = py:call(aiso, quick, [1], #{}, ?LIVENESS_MS),
    receive {first, F} -> {error, cancelled} = F after ?LIVENESS_MS -> ct:fail(first_not_answered) end,
    1 = stat(abandoned_workers),
    #{restarts := 0} = pyport_ct_lib:stats(),
    %% A second stuck loop thread: one past the limit restarts the port.
    spawn(fun() -> Self ! {second, py:call(aiso, sleeper, [3600], #{}, infinity)} end),
    wait_until(fun() -> stat(async_tasks) =:= 1 end, ?LIVENESS_MS, second_sleeper_running),
    spawn(fun() -> py:call(aiso, quick, [2], #{}, ?LIVENESS_MS) end),
    receive {second, S} -> {error, {pyport_exit, 6}} = S after ?LIVENESS_MS -> ct:fail(second_not_answered) end,
    wait_answering(),
    #{last_exit := {exit_status, 6}} = pyport_ct_lib:stats(),
    ok.

%% A coroutine spinning in pure Python (no await) blocks the loop while
%% holding the GIL only between switches: the write-off takes the loop from
%% it, and CallCancelled, raised in its thread, ends it.
pure_python_spinning_coroutine_is_written_off(_Config) ->
    Self = self(),
    spawn_link(fun() -> Self ! {spinner, py:call(aiso, spinner, [<<"s">>], #{}, infinity)} end),
    wait_seen(<<"s">>, [<<"started">>]),
    {ok, 3} = py:call(aiso, quick, [3], #{}, ?LIVENESS_MS),
    receive {spinner, R} -> {error, cancelled} = R after ?LIVENESS_MS -> ct:fail(spinner_not_answered) end,
    wait_seen(<<"s">>, [<<"started">>, <<"finally">>]),
    wait_until(fun() -> stat(abandoned_workers) =:= 0 end, ?LIVENESS_MS, spinner_thread_back),
    #{restarts := 0} = pyport_ct_lib:stats(),
    ok.

%%--------------------------------------------------------------------
%% Callbacks from coroutines

%% Three coroutines call an Erlang function that answers only when the test
%% opens its gate: all three callbacks are in flight at once (the first does
%% not block the loop for the others), and an unrelated coroutine is answered
%% while they all wait. (Before: one callback at a time, the rest of the loop
%% stopped behind it.)
callbacks_from_coroutines_run_side_by_side(_Config) ->
    Self = self(),
    ok = py:register_function(gate, fun([N]) ->
                                            Self ! {at_gate, self(), N},
                                            receive open -> N * 10 end
                                    end),
    Callers = [spawn_link(fun() -> Self ! {gated, self(), py:call(aiso, via_erlang, [gate, N], #{}, ?LIVENESS_MS)} end)
               || N <- [1, 2, 3]],
    Gates = [receive {at_gate, G, N} -> {N, G} after ?LIVENESS_MS -> ct:fail({callback_not_started, N}) end
             || N <- [1, 2, 3]],
    %% All three callback processes wait at once; the loop still runs.
    {ok, 42} = py:call(aiso, quick, [42], #{}, ?LIVENESS_MS),
    {ok, <<"nap">>} = py:call(aiso, nap, [0.05, nap], #{}, ?LIVENESS_MS),
    [G ! open || {_, G} <- Gates],
    ?assertEqual([{ok, 10}, {ok, 20}, {ok, 30}], pyport_ct_lib:collect(gated, Callers)),
    wait_until(fun() -> stat(async_tasks) =:= 0 end, ?LIVENESS_MS, tasks_done),
    pyport_ct_lib:assert_mailbox_empty().

%% A callback that never answers: the coroutine's caller times out, which ends
%% the wait (CancelledError in the coroutine) and kills the callback's process;
%% the loop was never blocked meanwhile. (Before: the loop stopped for
%% callback_timeout, 30 s, and the caller's timeout did not end the wait.)
callback_wait_ends_with_the_callers_timeout(_Config) ->
    Self = self(),
    ok = py:register_function(gate, fun([_]) -> Self ! {at_gate, self()}, receive never -> ok end end),
    T0 = now_ms(),
    Caller = spawn_link(fun() -> Self ! {gated, py:call(aiso, via_erlang, [gate, 1], #{}, 1000)} end),
    Gate = receive {at_gate, G} -> G after ?LIVENESS_MS -> ct:fail(callback_not_started) end,
    MRef = erlang:monitor(process, Gate),
    {ok, 9} = py:call(aiso, quick, [9], #{}, ?LIVENESS_MS),
    receive {gated, R} -> {error, timeout} = R after ?LIVENESS_MS -> ct:fail(caller_not_answered) end,
    receive {'DOWN', MRef, process, Gate, Why} -> killed = Why
    after ?LIVENESS_MS -> ct:fail(callback_process_not_killed)
    end,
    ct:pal("callback in a coroutine: caller timed out and callback killed after ~b ms", [now_ms() - T0]),
    wait_until(fun() -> stat(async_tasks) =:= 0 andalso maps:get(callbacks, pyport_ct_lib:stats()) =:= 0 end,
               ?LIVENESS_MS, nothing_left),
    unlink(Caller),
    ok.

%% A py:eval made inside the Erlang callback of a coroutine runs (on the
%% thread that waits for the callback) and its value comes back.
callback_in_a_coroutine_nests_python_calls(_Config) ->
    ok = py:register_function(nested, fun([X]) -> {ok, V} = py:eval(<<"x * 3">>, #{x => X}), V end),
    {ok, 21} = py:call(aiso, via_erlang, [nested, 7], #{}, ?LIVENESS_MS),
    ok.

%%--------------------------------------------------------------------
%% erlang.self()

%% Inside a coroutine, and inside tasks it creates, erlang.self() is the
%% process whose call made the coroutine. (Before: erlang.NoCaller.)
self_is_the_caller_in_coroutines_and_their_tasks(_Config) ->
    Me = self(),
    {ok, Me} = py:call(aiso, who, [], #{}, ?LIVENESS_MS),
    {ok, Me} = py:call(aiso, who_in_a_task, [], #{}, ?LIVENESS_MS),
    {ok, [Me, Me]} = py:call(aiso, who_in_a_gathered_pair, [], #{}, ?LIVENESS_MS),
    {ok, Me} = py:eval(<<"__import__('aiso').who()">>, #{}, ?LIVENESS_MS),
    %% Two processes at once: each sees itself.
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {who, self(), py:call(aiso, who, [], #{}, ?LIVENESS_MS)} end)
            || _ <- [1, 2]],
    ?assertEqual([{ok, P} || P <- Pids], pyport_ct_lib:collect(who, Pids)),
    ok.

%%--------------------------------------------------------------------
%% Tasks that swallow their cancellation

%% The coroutine catches CancelledError and goes on. Its caller is answered
%% at once ({error, timeout}); after the grace period (abandon_after_ms) the
%% task is dropped from async_tasks with a warning, and its coroutine is
%% closed, so it stops running. (Before: async_tasks stayed up, the task ran
%% for ever.)
swallowed_cancellation_is_dropped_after_grace(_Config) ->
    pyport_ct_lib:capture_logs(async_isolation_capture),
    {error, timeout} = py:call(aiso, stubborn, [<<"t">>], #{}, 300),
    wait_until(fun() -> {ok, [<<"swallowed">>]} =:= py:call(aiso, seen, [<<"t">>]) end,
               ?LIVENESS_MS, cancellation_swallowed),
    wait_until(fun() -> stat(async_tasks) =:= 0 end, ?LIVENESS_MS, task_dropped),
    %% Closed: its lap counter stops.
    {ok, Laps} = py:eval(<<"__import__('aiso').laps['t']">>),
    {ok, <<"nap">>} = py:call(aiso, nap, [0.2, nap], #{}, ?LIVENESS_MS),
    {ok, Laps} = py:eval(<<"__import__('aiso').laps['t']">>),
    Logs = pyport_ct_lib:logged(),
    ?assert(lists:any(fun(L) -> has(L, <<"aiso.stubborn">>) andalso has(L, <<"ignored its cancellation">>) end,
                      Logs), Logs),
    ok.

%%--------------------------------------------------------------------
%% Found by review: what must be left alone, what must still be watched

%% A coroutine that calls Erlang and then works for 3 times abandon_after_ms
%% (sleeping, then spinning), with nothing else waiting for the loop, is left
%% alone: its caller still waits. (The thread that resumed after the callback
%% was taken for stuck and written off, its caller answered `cancelled'.)
work_after_a_callback_is_left_alone(_Config) ->
    ok = py:register_function(echo, fun([X]) -> X end),
    {ok, <<"done">>} = py:call(aiso, call_then_sleep, [echo, 1.5], #{}, ?LIVENESS_MS),
    {ok, <<"done">>} = py:call(aiso, call_then_spin, [echo, 1.5], #{}, ?LIVENESS_MS),
    0 = stat(abandoned_workers),
    ok.

%% A py:call made inside the Erlang callback of a coroutine runs on the loop's
%% thread that waits for that callback; its own timeout interrupts it there,
%% as on a worker. (It ran unwatched: a spin never ended.)
nested_call_on_a_loop_thread_is_interrupted(_Config) ->
    Self = self(),
    ok = py:register_function(nested, fun([Tag]) ->
                                              Self ! {nested, py:call(aiso, spin_forever, [Tag], #{}, 1000)},
                                              ok
                                      end),
    spawn_link(fun() -> Self ! {outer, py:call(aiso, via_erlang, [nested, <<"n">>], #{}, ?LIVENESS_MS)} end),
    receive {nested, N} -> {error, timeout} = N after ?LIVENESS_MS -> ct:fail(no_nested_answer) end,
    wait_seen(<<"n">>, [<<"started">>, <<"finally">>]),
    receive {outer, O} -> {ok, <<"ok">>} = O after ?LIVENESS_MS -> ct:fail(no_outer_answer) end,
    ok.

%% With no room for another loop thread (max_threads), a coroutine's callback
%% holds the loop for its duration; nobody takes it for stuck: six coroutines
%% whose Erlang function takes 1 s all get their answer.
callbacks_at_max_threads_are_answered(_Config) ->
    ok = py:register_function(slow, fun([X]) -> timer:sleep(1000), X end),
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {r, self(), py:call(aiso, via_erlang, [slow, N], #{}, 30000)} end)
            || N <- lists:seq(1, 6)],
    ?assertEqual([{ok, N} || N <- lists:seq(1, 6)], pyport_ct_lib:collect(r, Pids)),
    0 = stat(abandoned_workers),
    ok.

%% A coroutine already asleep (asyncio.sleep 0.3) when another blocks the loop
%% is work waiting once its timer is due: the blocked thread is written off and
%% the sleeper is answered.
timers_due_behind_a_blocked_loop_go_on(_Config) ->
    Self = self(),
    spawn_link(fun() -> Self ! {nap, py:call(aiso, nap, [0.3, nap], #{}, ?LIVENESS_MS)} end),
    wait_until(fun() -> stat(async_tasks) =:= 1 end, ?LIVENESS_MS, nap_running),
    spawn_link(fun() -> Self ! {blocker, py:call(aiso, blocker, [<<"t">>], #{}, infinity)} end),
    receive {nap, N} -> {ok, <<"nap">>} = N after ?LIVENESS_MS -> ct:fail(nap_not_answered) end,
    receive {blocker, B} -> {error, cancelled} = B after ?LIVENESS_MS -> ct:fail(blocker_not_answered) end,
    ok.

%% The written-off thread's remains (its coroutine's finally, run once
%% time.sleep returns) set an asyncio.Event that another coroutine awaits,
%% while the loop's thread sleeps in select: the waiter is woken.
wakeups_from_a_written_off_thread_are_not_lost(_Config) ->
    Self = self(),
    {ok, true} = py:call(aiso, make_event, [], #{}, ?LIVENESS_MS),
    spawn_link(fun() -> Self ! {waiter, py:call(aiso, wait_event, [], #{}, ?LIVENESS_MS)} end),
    wait_until(fun() -> stat(async_tasks) =:= 1 end, ?LIVENESS_MS, waiter_running),
    spawn_link(fun() -> Self ! {blocker, py:call(aiso, blocker_then_set, [2.0], #{}, infinity)} end),
    wait_seen(<<"bs">>, [<<"started">>]),
    {ok, 1} = py:call(aiso, quick, [1], #{}, ?LIVENESS_MS),
    receive {blocker, B} -> {error, cancelled} = B after ?LIVENESS_MS -> ct:fail(blocker_not_answered) end,
    receive {waiter, W} -> {ok, <<"woke">>} = W after ?LIVENESS_MS -> ct:fail(waiter_not_woken) end,
    ok.

%% A task that swallows its cancellation is dropped, and closing it runs a
%% finally that blocks for an hour: that close is a callback like any other, so
%% the loop's thread is written off once other work waits, and that work is
%% answered. (The close ran inside the inbox's drain: the requests taken with it
%% were lost, and nothing counted as waiting.)
dropped_task_with_a_blocking_finally_loses_nothing(_Config) ->
    {error, timeout} = py:call(aiso, stubborn_blocking_finally, [], #{}, 200),
    wait_until(fun() -> stat(async_tasks) =:= 0 end, ?LIVENESS_MS, task_dropped),
    wait_seen(<<"sbf">>, [<<"started">>, <<"swallowed">>, <<"closing">>]),
    {ok, 7} = py:call(aiso, quick, [7], #{}, ?LIVENESS_MS),
    ok.

%%--------------------------------------------------------------------

wait_seen(Tag, Expected) ->
    wait_until(fun() -> {ok, Expected} =:= py:call(aiso, seen, [Tag], #{}, 2000) end,
               ?LIVENESS_MS, {events, Tag, Expected}).

%% Until a fresh port answers a call.
wait_answering() ->
    wait_until(fun() -> {ok, 2.0} =:= py:call(math, sqrt, [4.0], #{}, 2000) end,
               ?LIVENESS_MS, port_answering).
