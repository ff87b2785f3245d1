%% @doc max_threads caps the port's Python worker threads in all: with many
%% callers blocked in Python, spares stop at the cap and every call still
%% completes.
-module(max_threads_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([spares_stop_at_max_threads/1]).

all() -> [spares_stop_at_max_threads].

init_per_suite(Config) ->
    Saved = pyport_ct_lib:save_env([workers, max_workers, max_threads]),
    ok = application:set_env(pyport, workers, 1),
    ok = application:set_env(pyport, max_workers, 16),
    ok = application:set_env(pyport, max_threads, 3),
    _ = pyport_ct_lib:start_app(),
    [{saved_env, Saved} | Config].

end_per_suite(Config) ->
    ok = pyport_ct_lib:stop_app(),
    pyport_ct_lib:restore_env(?config(saved_env, Config)).

%% 12 callers each sleep 0.3 s in Python: max_workers (16) would allow a spare
%% for each, max_threads (3) allows three threads in all.
spares_stop_at_max_threads(_Config) ->
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {done, self(), py:call(time, sleep, [0.3], #{}, 30000)} end)
            || _ <- lists:seq(1, 12)],
    Peak = peak_threads(Pids, 0),
    ct:pal("max_threads: peak of ~b Python worker threads for 12 sleeping callers", [Peak]),
    ?assertEqual(3, Peak).

%% Samples python_threads until every caller has answered (each with ok).
peak_threads([], Peak) ->
    Peak;
peak_threads(Pids, Peak) ->
    Now = pyport_ct_lib:stat(python_threads),
    receive
        {done, Pid, Result} ->
            ?assertEqual({ok, undefined}, Result),
            peak_threads(lists:delete(Pid, Pids), max(Peak, Now))
    after 20 ->
            peak_threads(Pids, max(Peak, Now))
    end.
