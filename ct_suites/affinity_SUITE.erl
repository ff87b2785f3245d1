%% Home threads: a process's Python state stays on one thread, so objects
%% bound to the thread that made them (sqlite3 connections, thread-locals)
%% keep working across its calls, under load, after a write-off and after
%% long idle times; `thread_affinity => none' restores floating requests.
-module(affinity_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(pyport_ct_lib, [stat/1, wait_until/3, has/2]).

-define(LIVENESS_MS, 10000).

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [sqlite_connection_survives_load,
     thread_local_survives_load,
     homes_spread_evenly,
     each_process_stays_on_its_thread,
     affinity_none_floats,
     affinity_always_homes_every_process,
     written_off_home_keeps_namespaces,
     idle_home_thread_keeps_its_objects].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

case_env(homes_spread_evenly) -> [{workers, 4}];
case_env(affinity_none_floats) -> [{thread_affinity, none}];
case_env(affinity_always_homes_every_process) -> [{thread_affinity, always}];
case_env(written_off_home_keeps_namespaces) ->
    [{workers, 1}, {max_workers, 2}, {abandon_after_ms, 300}];
case_env(idle_home_thread_keeps_its_objects) -> [{workers, 1}, {spare_idle_ms, 200}];
case_env(_) -> [].

init_per_testcase(Case, Config) ->
    Saved = pyport_ct_lib:save_env([K || {K, _} <- case_env(Case)]),
    ok = pyport_ct_lib:stop_app(),
    [ok = application:set_env(pyport, K, V) || {K, V} <- case_env(Case)],
    _ = pyport_ct_lib:start_app(),
    [{saved_env, Saved} | Config].

end_per_testcase(_Case, Config) ->
    _ = logger:remove_handler(affinity_capture),
    pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config)).

%%--------------------------------------------------------------------

-define(SQLITE, <<"import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute('create table t(x)')\n">>).

%% The README's example: 100 calls use a connection made in an earlier call
%% while 8 other processes keep every other worker busy.
sqlite_connection_survives_load(_Config) ->
    ok = py:exec(?SQLITE),
    with_load(8, fun() ->
                         [{ok, _} = py:eval(<<"c.execute('insert into t values (?)', (i,)).rowcount">>,
                                            #{i => I})
                          || I <- lists:seq(1, 100)]
                 end),
    {ok, 100} = py:eval(<<"c.execute('select count(*) from t').fetchone()[0]">>),
    ok.

thread_local_survives_load(_Config) ->
    ok = py:exec(<<"import threading\nlocal = threading.local()\nlocal.v = 'mine'\n">>),
    with_load(8, fun() ->
                         [{ok, <<"mine">>} = py:eval(<<"getattr(local, 'v', None)">>)
                          || _ <- lists:seq(1, 100)]
                 end),
    ok.

%% 200 processes create namespaces one after another (each waits for the one
%% before): every choice finds all workers idle, so each new home goes to the
%% worker with the fewest homes and no thread ends up with more than one home
%% more than another. (Created all at once, the spread depends on when spares
%% start under load: the first workers take homes while every worker is busy.)
homes_spread_evenly(_Config) ->
    Self = self(),
    Pids = [begin
                P = spawn(fun() ->
                                  ok = py:exec(<<"x = 1">>),
                                  Self ! {homed, self()},
                                  receive stop -> ok end
                          end),
                receive {homed, P} -> P after ?LIVENESS_MS -> ct:fail({not_homed, P}) end
            end || _ <- lists:seq(1, 200)],
    Homes = stat(thread_homes),
    ct:pal("affinity: 200 namespaces created one after another: homes per thread ~w", [Homes]),
    ?assertEqual(200, lists:sum(Homes)),
    ?assert(lists:max(Homes) - lists:min(Homes) =< 1, Homes),
    [P ! stop || P <- Pids],
    wait_until(fun() -> lists:sum(stat(thread_homes)) =:= 0 end, ?LIVENESS_MS, homes_freed),
    ok.

%% 64 processes at once, each with a namespace, each calling 20 times: every
%% process sees one thread ident for all its calls.
each_process_stays_on_its_thread(_Config) ->
    Idents = pyport_ct_lib:thread_idents_of_callers(64, 20),
    ?assertEqual([], [I || I <- Idents, length(I) =/= 1]),
    Threads = length(lists:usort(lists:append(Idents))),
    ct:pal("affinity: 64 concurrent processes homed on ~b threads", [Threads]),
    ?assert(Threads > 1, Threads),
    ok.

%% Without affinity a process's calls go to whichever worker is free: under
%% load the connection made by one thread is used from another.
affinity_none_floats(_Config) ->
    ok = py:exec(?SQLITE),
    Results = with_load(8, fun() ->
                                   [py:eval(<<"c.execute('insert into t values (1)').rowcount">>)
                                    || _ <- lists:seq(1, 20)]
                           end),
    Wrong = [R || {error, {python, <<"sqlite3.ProgrammingError">>, _, _}} = R <- Results],
    ct:pal("affinity: thread_affinity none: ~b of 20 calls on another thread", [length(Wrong)]),
    ?assert(length(Wrong) > 0, Results),
    [0] = lists:usort(stat(thread_homes)),
    ok.

%% `always': a process that never had a namespace gets a home on its first
%% request (a module call); `namespace' (the default) gives it none.
affinity_always_homes_every_process(_Config) ->
    %% (this test process made requests when the application started: it has a home too)
    Base = lists:sum(stat(thread_homes)),
    Self = self(),
    P = spawn(fun() -> Self ! {r, py:call(math, sqrt, [4.0])}, receive stop -> ok end end),
    receive {r, {ok, 2.0}} -> ok after ?LIVENESS_MS -> ct:fail(no_answer) end,
    ?assertEqual(Base + 1, lists:sum(stat(thread_homes))),
    P ! stop,
    wait_until(fun() -> lists:sum(stat(thread_homes)) =:= Base end, ?LIVENESS_MS, home_freed),
    ok.

%% Two processes share a home; one of them gets stuck in C (time.sleep
%% ignores the cancellation). The worker is written off, both namespaces move
%% to another thread with their values, and the move is logged.
written_off_home_keeps_namespaces(_Config) ->
    pyport_ct_lib:capture_logs(affinity_capture),
    Self = self(),
    B = spawn(fun() -> ok = py:exec(<<"b = 2">>), Self ! {b, ready}, receive go -> Self ! {b, py:eval(<<"b">>)} end end),
    receive {b, ready} -> ok after ?LIVENESS_MS -> ct:fail(b_not_ready) end,
    ok = py:exec(<<"a = 1">>),
    [2] = stat(thread_homes),
    {error, timeout} = py:eval(<<"__import__('time').sleep(30)">>, #{}, 100),
    wait_until(fun() -> stat(abandoned_workers) =:= 1 end, ?LIVENESS_MS, written_off),
    B ! go,
    receive {b, R} -> ?assertEqual({ok, 2}, R) after ?LIVENESS_MS -> ct:fail(b_not_answered) end,
    {ok, 1} = py:eval(<<"a">>, #{}, ?LIVENESS_MS),
    Moved = [L || L <- pyport_ct_lib:logged(), has(L, <<"moved to thread">>)],
    ?assertEqual(2, length(Moved), pyport_ct_lib:logged()),
    ok.

%% A spare that became a home never exits for being idle: after ten idle
%% times the connection still works, on the same thread.
idle_home_thread_keeps_its_objects(_Config) ->
    Self = self(),
    Blocker = spawn(fun() -> Self ! {blocker, py:eval(<<"__import__('time').sleep(3)">>, #{}, 10000)} end),
    wait_until(fun() -> stat(busy_workers) >= 1 end, ?LIVENESS_MS, blocker_running),
    ok = py:exec(<<?SQLITE/binary, "import threading\nhome = threading.get_ident()\n">>),
    receive {blocker, {ok, undefined}} -> ok after ?LIVENESS_MS -> ct:fail(Blocker) end,
    timer:sleep(2000),   % ten times spare_idle_ms: the time passing is what is tested
    {ok, 1} = py:eval(<<"c.execute('insert into t values (1)').rowcount">>),
    {ok, true} = py:eval(<<"threading.get_ident() == home">>),
    ok.

%%--------------------------------------------------------------------
%% helpers

%% Runs Fun while N other processes keep workers busy with short sleeps.
with_load(N, Fun) ->
    Stop = atomics:new(1, []),
    Loaders = [spawn_link(fun() -> load_loop(Stop) end) || _ <- lists:seq(1, N)],
    wait_until(fun() -> stat(busy_workers) >= min(N, 4) end, ?LIVENESS_MS, load_running),
    try Fun()
    after
        atomics:put(Stop, 1, 1),
        [pyport_ct_lib:wait_down(L) || L <- Loaders]
    end.

load_loop(Stop) ->
    case atomics:get(Stop, 1) of
        1 -> ok;
        0 ->
            {ok, undefined} = py:eval(<<"__import__('time').sleep(0.05)">>, #{}, 10000),
            load_loop(Stop)
    end.

