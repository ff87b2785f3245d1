%% @doc Request-size and back-pressure limits of the Erlang side.
-module(limits_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([oversized_request_is_refused_before_the_port/1, overloaded_when_in_flight_is_full/1,
         shared_dict_ops_raise_overloaded/1]).

all() -> [oversized_request_is_refused_before_the_port, overloaded_when_in_flight_is_full,
          shared_dict_ops_raise_overloaded].

init_per_suite(Config) ->
    %% Other suites of the same ct_run may have loaded or started the application.
    ok = pyport_ct_lib:stop_app(),
    _ = application:load(pyport),
    Saved = pyport_ct_lib:save_env([max_frame_bytes, max_in_flight]),
    ok = application:set_env(pyport, max_frame_bytes, 1 bsl 20),
    ok = application:set_env(pyport, max_in_flight, 4),
    _ = pyport_ct_lib:start_app(),
    [{saved_env, Saved} | Config].

end_per_suite(Config) ->
    ok = pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config)),
    pyport_ct_lib:stop_app().

%% A request over max_frame_bytes is refused in the caller; the port (which would
%% take the oversized frame for a corrupt stream and exit) never sees it.
oversized_request_is_refused_before_the_port(_Config) ->
    {ok, #{os_pid := Pid, restarts := Restarts}} = py:stats(),
    Big = binary:copy(<<"x">>, 1 bsl 20),
    {error, {request_too_large, Size, 1048576}} = py:call(builtins, len, [Big]),
    true = Size > 1 bsl 20,
    {error, {request_too_large, _, _}} = py:eval(<<"len(b)">>, #{b => Big}),
    {error, {request_too_large, _, _}} = py:exec(<<"pass">>, #{b => Big}),
    {ok, SD} = py:shared_dict_new(),
    {error, {request_too_large, _, _}} = py:shared_dict_set(SD, <<"k">>, Big),
    %% Just under the limit still goes through, on the same port.
    {ok, 1000} = py:call(builtins, len, [binary:copy(<<"x">>, 1000)]),
    {ok, #{os_pid := Pid, restarts := Restarts}} = py:stats().

%% With max_in_flight = 4, a burst of 20 slow calls: some are told `overloaded'
%% at once, the others complete, every caller gets an answer.
overloaded_when_in_flight_is_full(_Config) ->
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {self(), py:eval(<<"__import__('time').sleep(0.3) or 1">>)} end)
            || _ <- lists:seq(1, 20)],
    Results = [receive {P, R} -> R after 15000 -> ct:fail({no_answer, P}) end || P <- Pids],
    Ok = length([ok || {ok, 1} <- Results]),
    Overloaded = length([x || {error, overloaded} <- Results]),
    ct:log("~b ok, ~b overloaded", [Ok, Overloaded]),
    20 = Ok + Overloaded,
    true = Ok >= 4,
    true = Overloaded >= 1,
    {ok, #{pending := 0}} = py:stats().

%% README "Failure semantics": with max_in_flight requests in the port, SharedDict
%% operations raise error(overloaded). Four calls that wait for a file fill the
%% port (max_in_flight = 4) until the test creates it.
shared_dict_ops_raise_overloaded(Config) ->
    Flag = filename:join(?config(priv_dir, Config), "release_blockers"),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    Self = self(),
    Wait = <<"import os, time\nt = time.monotonic()\n"
             "while not os.path.exists(flag) and time.monotonic() - t < 60:\n    time.sleep(0.01)\n">>,
    Blockers = [spawn_link(fun() ->
                                   Self ! {self(), py:exec(Wait, #{flag => list_to_binary(Flag)})}
                           end) || _ <- lists:seq(1, 4)],
    pyport_ct_lib:wait_until(
      fun() -> maps:get(pending, gen_server:call(pyport_server, stats)) =:= 4 end,
      10000, in_flight_full),
    try
        {error, overloaded} = py:eval(<<"1">>),
        ?assertError(overloaded, py:shared_dict_get(SD, <<"k">>)),
        ?assertError(overloaded, py:shared_dict_get(SD, <<"k">>, dflt)),
        ?assertError(overloaded, py:shared_dict_set(SD, <<"k">>, 2)),
        ?assertError(overloaded, py:shared_dict_del(SD, <<"k">>)),
        ?assertError(overloaded, py:shared_dict_keys(SD)),
        ?assertError(overloaded, py:shared_dict_new())
    after
        ok = file:write_file(Flag, <<"go">>)
    end,
    [ok, ok, ok, ok] = [receive {P, R} -> R after 30000 -> ct:fail({no_answer, P}) end
                        || P <- Blockers],
    %% nothing was changed by the refused operations
    1 = py:shared_dict_get(SD, <<"k">>),
    ok = py:shared_dict_destroy(SD).
