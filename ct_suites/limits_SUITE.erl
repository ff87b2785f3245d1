%% @doc Request-size and back-pressure limits of the Erlang side.
-module(limits_SUITE).

-include_lib("common_test/include/ct.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([oversized_request_is_refused_before_the_port/1, overloaded_when_in_flight_is_full/1]).

all() -> [oversized_request_is_refused_before_the_port, overloaded_when_in_flight_is_full].

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
