%% A pool of ports (app env `ports'): which port serves a request, what a crash of
%% one port does to the others, start-up code in every port, and py:stats per port.
-module(pool_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2, end_per_testcase/2]).
-export([every_port_runs_its_own_python/1,
         a_namespace_stays_on_its_home_port/1,
         calls_without_a_namespace_go_to_the_least_loaded_port/1,
         a_home_is_kept_when_the_load_changes/1,
         a_crash_fails_only_the_callers_of_that_port/1,
         a_crash_frees_only_the_namespaces_homed_there/1,
         startup_code_and_sys_path_run_in_every_port/1,
         stats_has_one_map_per_port_and_sums/1,
         stats_of_a_pool_with_a_port_down/1,
         callbacks_call_back_into_their_own_port/1,
         async_calls_and_casts_on_every_port/1,
         streams_on_another_port_ack_and_cancel/1,
         restart_replaces_every_port/1,
         configure_logging_reaches_every_port/1,
         ports_auto_is_one_per_scheduler/1,
         ports_zero_starts_no_port/1,
         a_bad_ports_value_fails_the_start/1]).

-define(LIB, pyport_ct_lib).
-define(POOL, 2).

all() ->
    [every_port_runs_its_own_python,
     a_namespace_stays_on_its_home_port,
     calls_without_a_namespace_go_to_the_least_loaded_port,
     a_home_is_kept_when_the_load_changes,
     a_crash_fails_only_the_callers_of_that_port,
     a_crash_frees_only_the_namespaces_homed_there,
     startup_code_and_sys_path_run_in_every_port,
     stats_has_one_map_per_port_and_sums,
     stats_of_a_pool_with_a_port_down,
     callbacks_call_back_into_their_own_port,
     async_calls_and_casts_on_every_port,
     streams_on_another_port_ack_and_cancel,
     restart_replaces_every_port,
     configure_logging_reaches_every_port,
     ports_auto_is_one_per_scheduler,
     ports_zero_starts_no_port,
     a_bad_ports_value_fails_the_start].

-define(ENV_KEYS, [ports, startup_code, sys_path, start_timeout_ms, python_log_level]).

init_per_suite(Config) ->
    Saved = ?LIB:save_env(?ENV_KEYS),
    ok = ?LIB:stop_app(),
    [{saved_env, Saved} | Config].

end_per_suite(Config) ->
    ?LIB:restore_env_and_restart(?config(saved_env, Config)).

init_per_testcase(_Case, Config) ->
    ?LIB:restore_env(?config(saved_env, Config)),
    %% Loaded first: loading would put back the .app file's env.
    _ = application:load(pyport),
    ok = application:set_env(pyport, ports, ?POOL),
    Config.

end_per_testcase(_Case, _Config) ->
    ?LIB:stop_app().

%%--------------------------------------------------------------------

start() ->
    _ = ?LIB:start_app(),
    ok = ?LIB:wait_until(fun() -> maps:get(ready, ?LIB:stats()) end, 30000, pool_ready).

%% The OS pid of each port, in pool order.
os_pids() ->
    [maps:get(os_pid, P) || P <- maps:get(ports, ?LIB:stats())].

%% Runs Fun in a fresh process whose home is port I (as if its first namespace
%% request had been sent there), and returns its result.
on_port(I, Fun) ->
    ?LIB:run_in_process(fun() ->
                                true = ets:insert_new(pyport_homes, {self(), I}),
                                Fun()
                        end).

pid_of_port_serving(Fun) ->
    {ok, Pid} = Fun(),
    Pid.

getpid() ->
    pid_of_port_serving(fun() -> py:eval(<<"__import__('os').getpid()">>) end).

%%--------------------------------------------------------------------

every_port_runs_its_own_python(_Config) ->
    ok = start(),
    Pids = os_pids(),
    ?assertEqual(?POOL, length(Pids)),
    ?assertEqual(?POOL, length(lists:usort(Pids))),
    %% Each port answers from its own interpreter process.
    ?assertEqual(Pids, [on_port(I, fun getpid/0) || I <- lists:seq(1, ?POOL)]).

a_namespace_stays_on_its_home_port(_Config) ->
    ok = start(),
    %% Many processes at once, each defining a variable then reading it back many
    %% times: every read finds it, on the same interpreter as the definition.
    Self = self(),
    Workers = [spawn_link(fun() ->
                                  ok = py:exec(<<"import os\nhome = os.getpid()\nmine = ", (integer_to_binary(N))/binary>>),
                                  Rs = [py:eval(<<"(home == os.getpid(), mine)">>) || _ <- lists:seq(1, 20)],
                                  Calls = [py:call('__main__', 'os.getpid', []) || _ <- lists:seq(1, 5)],
                                  {ok, Home} = py:eval(<<"home">>),
                                  Self ! {done, self(), {N, Rs, Calls, Home}},
                                  receive stop -> ok end
                          end) || N <- lists:seq(1, 8)],
    Results = ?LIB:collect(done, Workers),
    Pids = os_pids(),
    Homes = [begin
                 ?assertEqual([{ok, {true, N}} || _ <- lists:seq(1, 20)], Rs),
                 ?assertEqual([{ok, Home} || _ <- lists:seq(1, 5)], Calls),
                 ?assert(lists:member(Home, Pids)),
                 Home
             end || {N, Rs, Calls, Home} <- Results],
    %% Each port holds exactly the namespaces of the processes homed there.
    ?assertEqual([length([H || H <- Homes, H =:= P]) || P <- Pids],
                 [maps:get(namespaces, P) || P <- maps:get(ports, ?LIB:stats())]),
    [W ! stop || W <- Workers],
    ok.

calls_without_a_namespace_go_to_the_least_loaded_port(_Config) ->
    ok = start(),
    [P1, P2] = os_pids(),
    Call = fun() -> py:call(os, getpid, []) end,
    %% A quiet pool: the first port serves.
    ?assertEqual({ok, P1}, ?LIB:run_in_process(Call)),
    %% With a call in flight on port 1, a call of a process without a home goes to port 2.
    B1 = hold_port(1),
    Self = self(),
    Roamer = spawn_link(fun() ->
                                Self ! {r, self(), Call()},
                                receive next -> Self ! {r, self(), Call()} end
                        end),
    ?assertEqual([{ok, P2}], ?LIB:collect(r, [Roamer])),
    %% ... and with one in flight on each, to the first again. Such calls give no
    %% home: the same process goes where the load is.
    B2 = hold_port(2),
    Roamer ! next,
    ?assertEqual([{ok, P1}], ?LIB:collect(r, [Roamer])),
    release(B1),
    release(B2).

a_home_is_kept_when_the_load_changes(_Config) ->
    ok = start(),
    [_P1, P2] = os_pids(),
    %% Port 1 busy: the process's first namespace request homes it on port 2, and it
    %% stays there once port 1 is free (where a process without a home would go).
    B1 = hold_port(1),
    Self = self(),
    P = spawn_link(fun() ->
                           ok = py:exec(<<"import os\nx = os.getpid()">>),
                           Self ! {first, self(), ok},
                           receive go -> ok end,
                           Self ! {second, self(), py:eval(<<"(x, os.getpid())">>)}
                   end),
    [ok] = ?LIB:collect(first, [P]),
    release(B1),
    P ! go,
    ?assertEqual([{ok, {P2, P2}}], ?LIB:collect(second, [P])).

a_crash_fails_only_the_callers_of_that_port(_Config) ->
    ok = start(),
    [P1, _P2] = os_pids(),
    Gen2 = port_field(2, generation),
    Self = self(),
    %% A call in flight on each port.
    Victim = spawn_link(fun() -> Self ! {r, self(), on_port(1, fun() -> py:eval(<<"__import__('time').sleep(30)">>, #{}, 60000) end)} end),
    Survivor = hold_port(2),
    ?LIB:wait_until(fun() -> port_field(1, pending) =:= 1 end, 10000, call_on_port_1),
    _ = os:cmd("kill -9 " ++ integer_to_list(P1)),
    [{error, {pyport_exit, _}}] = ?LIB:collect(r, [Victim]),
    %% The other port's call was not touched and completes when let go.
    ?assertEqual({ok, <<"released">>}, release(Survivor)),
    ?assertEqual(Gen2, port_field(2, generation)),
    ?assertEqual(0, port_field(2, restarts)),
    %% Port 1 comes back by itself.
    ?LIB:wait_until(fun() -> port_field(1, ready) =:= true andalso port_field(1, os_pid) =/= P1 end,
                    30000, port_1_back),
    ?assertEqual(1, port_field(1, restarts)).

a_crash_frees_only_the_namespaces_homed_there(_Config) ->
    ok = start(),
    [P1, P2] = os_pids(),
    Self = self(),
    Homed = fun(I) ->
                    spawn_link(fun() ->
                                       true = ets:insert_new(pyport_homes, {self(), I}),
                                       ok = py:exec(<<"v = 'kept'">>),
                                       Self ! {defined, self()},
                                       receive check -> ok end,
                                       Self ! {v, self(), py:eval(<<"v">>)}
                               end)
            end,
    A = Homed(1),
    B = Homed(2),
    [ok, ok] = [receive {defined, X} -> ok after 10000 -> ct:fail(no_define) end || X <- [A, B]],
    _ = os:cmd("kill -9 " ++ integer_to_list(P1)),
    ?LIB:wait_until(fun() -> port_field(1, ready) =:= true andalso port_field(1, os_pid) =/= P1 end,
                    30000, port_1_back),
    [A ! check || true],
    [B ! check || true],
    [RA] = ?LIB:collect(v, [A]),
    [RB] = ?LIB:collect(v, [B]),
    ?assertMatch({error, {python, 'NameError', _, _}}, RA),
    ?assertEqual({ok, <<"kept">>}, RB),
    ?assertEqual(P2, port_field(2, os_pid)).

startup_code_and_sys_path_run_in_every_port(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "pool_path"),
    ok = filelib:ensure_path(Dir),
    ok = file:write_file(filename:join(Dir, "pool_startup_mod.py"), <<"VALUE = 42\n">>),
    ok = application:set_env(pyport, sys_path, [Dir]),
    ok = application:set_env(pyport, startup_code,
                             "import builtins, os, pool_startup_mod\n"
                             "builtins.STARTED_IN = os.getpid()\n"),
    ok = start(),
    Pids = os_pids(),
    ?assertEqual([{ok, {P, 42}} || P <- Pids],
                 [on_port(I, fun() -> py:eval(<<"(STARTED_IN, __import__('pool_startup_mod').VALUE)">>) end)
                  || I <- lists:seq(1, ?POOL)]).

stats_has_one_map_per_port_and_sums(_Config) ->
    ok = start(),
    B = hold_port(2),
    S = ?LIB:stats(),
    Ports = maps:get(ports, S),
    ?assertEqual([1, 2], [maps:get(index, P) || P <- Ports]),
    ?assertEqual(os_pids(), [maps:get(os_pid, P) || P <- Ports]),
    ?assertEqual([0, 1], [maps:get(pending, P) || P <- Ports]),
    %% Sums over the ports, the first port's identity at the top.
    ?assertEqual(1, maps:get(pending, S)),
    ?assertEqual(lists:sum([maps:get(workers, P) || P <- Ports]), maps:get(workers, S)),
    ?assertEqual(lists:sum([maps:get(python_threads, P) || P <- Ports]), maps:get(python_threads, S)),
    ?assertEqual(maps:get(os_pid, hd(Ports)), maps:get(os_pid, S)),
    ?assertEqual(maps:get(generation, hd(Ports)), maps:get(generation, S)),
    ?assertEqual({up, true}, {maps:get(port, S), maps:get(ready, S)}),
    ?assertEqual([up, up], [maps:get(port, P) || P <- Ports]),
    ?assertEqual([not_started, not_started], [maps:get(last_exit, P) || P <- Ports]),
    release(B).

stats_of_a_pool_with_a_port_down(_Config) ->
    %% A port that never comes up (its start-up code fails every time) is `down' in
    %% the stats; the other's figures are there.
    ok = application:set_env(pyport, startup_code,
                             "import os\nif os.environ.get('PYPORT_PORT_INDEX') == '2': raise SystemExit(3)\n"),
    _ = application:ensure_all_started(pyport),
    ?LIB:wait_until(fun() -> case py:stats() of
                                 {ok, #{ports := [#{ready := true}, #{ready := false} = P2]}} ->
                                     maps:get(restarts, P2, 0) >= 1;
                                 Other -> Other
                             end
                    end, 30000, one_up_one_down),
    {ok, S} = py:stats(),
    ?assertEqual({down, false}, {maps:get(port, S), maps:get(ready, S)}),
    ?assertEqual({ok, 2}, py:eval(<<"1 + 1">>)).

callbacks_call_back_into_their_own_port(_Config) ->
    ok = start(),
    Pids = os_pids(),
    ok = py:register_function(pool_where, fun([]) -> {ok, P} = py:call(os, getpid, []), P end),
    %% A callback's own py:call runs on the port whose Python thread waits for it,
    %% whichever port is busier.
    B = hold_port(1),
    ?assertEqual([{ok, {P, P}} || P <- Pids],
                 [on_port(I, fun() ->
                                     py:eval(<<"(__import__('os').getpid(), erlang.call('pool_where'))">>)
                             end) || I <- lists:seq(1, ?POOL)]),
    release(B),
    ok = py:unregister_function(pool_where).

async_calls_and_casts_on_every_port(_Config) ->
    ok = start(),
    Pids = os_pids(),
    %% spawn_call of __main__ runs in the caller's namespace, on its home port.
    ?assertEqual([{ok, {P, 7}} || P <- Pids],
                 [on_port(I, fun() ->
                                     ok = py:exec(<<"import os\ndef f(x): return (os.getpid(), x)">>),
                                     py:await(py:spawn_call('__main__', f, [7]), 10000)
                             end) || I <- lists:seq(1, ?POOL)]),
    %% A timed-out await cancels the work on the port that runs it.
    R = on_port(2, fun() ->
                           ok = py:exec(<<"def spin():\n    while True: pass\n">>),
                           Ref = py:spawn_call('__main__', spin, []),
                           {py:await(Ref, 100), ?LIB:wait_until(fun() -> port_field(2, busy_workers) =:= 0 end,
                                                                10000, cancelled_on_port_2)}
                   end),
    ?assertEqual({{error, timeout}, ok}, R),
    %% A cast of __main__ reaches the namespace on the home port.
    ok = py:register_function(pool_cast_done, fun([To, V]) -> To ! {cast_done, V}, ok end),
    P2 = lists:nth(2, Pids),
    ?assertEqual(P2, on_port(2, fun() ->
                                        ok = py:exec(<<"import os\ndef g(to): erlang.call('pool_cast_done', to, os.getpid())">>),
                                        ok = py:cast('__main__', g, [self()]),
                                        receive {cast_done, V} -> V after 10000 -> no_cast end
                                end)),
    ok = py:unregister_function(pool_cast_done).

streams_on_another_port_ack_and_cancel(_Config) ->
    ok = start(),
    [_P1, P2] = os_pids(),
    %% An ack-flow stream homed on port 2: its items come as acknowledged, and a cancel
    %% reaches the generator there (its finally runs).
    ok = py:register_function(pool_stream_closed, fun([To, Pid]) -> To ! {closed, Pid}, ok end),
    R = on_port(2, fun() ->
                           ok = py:exec(<<"import os, itertools\n"
                                          "def gen(to):\n"
                                          "    try:\n"
                                          "        for i in itertools.count(): yield (os.getpid(), i)\n"
                                          "    finally:\n"
                                          "        erlang.call('pool_stream_closed', to, os.getpid())\n">>),
                           {ok, Ref} = py:stream_start('__main__', gen, [self()], #{window => 2, flow => ack}),
                           Items = [receive {py_stream, Ref, {data, D}} -> ok = py:stream_ack(Ref), D
                                    after 10000 -> no_item
                                    end || _ <- lists:seq(1, 5)],
                           ok = py:stream_cancel(Ref),
                           Closed = receive {closed, C} -> C after 10000 -> not_closed end,
                           %% Acks and cancels of an ended stream are still `ok'.
                           ok = ?LIB:wait_until(fun() -> maps:get(open_streams, ?LIB:stats()) =:= 0 end,
                                                10000, stream_gone),
                           {Items, Closed, py:stream_ack(Ref), py:stream_cancel(Ref)}
                   end),
    ?assertEqual({[{P2, I} || I <- lists:seq(0, 4)], P2, ok, ok}, R),
    ok = py:unregister_function(pool_stream_closed).

restart_replaces_every_port(_Config) ->
    ok = start(),
    Before = os_pids(),
    ok = py:restart(),
    After = os_pids(),
    ?assertEqual(?POOL, length(After)),
    ?assertEqual([], [P || P <- After, lists:member(P, Before)]),
    ?assertEqual([true, true], [maps:get(ready, P) || P <- maps:get(ports, ?LIB:stats())]).

configure_logging_reaches_every_port(_Config) ->
    ok = start(),
    ok = py:configure_logging(#{level => error}),
    ?assertEqual([{ok, 40} || _ <- lists:seq(1, ?POOL)],
                 [on_port(I, fun() -> py:eval(<<"__import__('logging').getLogger().level">>) end)
                  || I <- lists:seq(1, ?POOL)]),
    ok = py:configure_logging().

ports_auto_is_one_per_scheduler(_Config) ->
    ok = application:set_env(pyport, ports, auto),
    ok = start(),
    ?assertEqual(erlang:system_info(schedulers_online), length(os_pids())).

ports_zero_starts_no_port(_Config) ->
    ok = application:set_env(pyport, ports, 0),
    {ok, _} = application:ensure_all_started(pyport),
    ?assertEqual([pyport_sd_owners], [Id || {Id, _, _, _} <- supervisor:which_children(pyport_sup)]),
    ?assertEqual({error, {pyport_unavailable, not_started}}, py:call(os, getpid, [])),
    ?assertEqual({error, {pyport_unavailable, not_started}}, py:stats()).

a_bad_ports_value_fails_the_start(_Config) ->
    [begin
         ok = application:set_env(pyport, ports, Bad),
         ?assertMatch({error, {pyport, {{bad_config, {ports, Bad}}, _}}},
                      application:ensure_all_started(pyport))
     end || Bad <- [-1, many, 1.5, "2"]].

%%--------------------------------------------------------------------

%% A call held in flight on port I until release/1: an erlang.call to a function
%% that waits for the test's word.
hold_port(I) ->
    Self = self(),
    Name = list_to_atom("pool_hold_" ++ integer_to_list(I)),
    ok = py:register_function(Name, fun([]) ->
                                            Self ! {held, I, self()},
                                            receive release -> released end
                                    end),
    Caller = spawn_link(fun() ->
                                R = on_port(I, fun() -> py:eval(<<"erlang.call('", (atom_to_binary(Name))/binary, "')">>) end),
                                Self ! {hold_result, self(), R}
                        end),
    Cb = receive {held, I, CbPid} -> CbPid after 10000 -> ct:fail({not_held, I}) end,
    {Caller, Cb}.

release({Caller, Cb}) ->
    Cb ! release,
    [R] = ?LIB:collect(hold_result, [Caller]),
    R.

port_field(I, Key) ->
    maps:get(Key, lists:nth(I, maps:get(ports, ?LIB:stats()))).
