%% @doc Fail-fast start (app env `start_timeout_ms'): application:start/1 returns only once
%% a port is ready (Python up, start-up code finished), or fails with a clear reason; without
%% the setting the start returns at once and the port comes up in the background.
-module(start_timeout_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2, end_per_testcase/2]).
-export([ready_port_before_start_returns/1, slow_startup_code_fails_the_start/1,
         crashing_port_fails_the_start/1, default_start_does_not_wait/1]).

-define(KEYS, [start_timeout_ms, startup_code, pyport_executable]).

all() ->
    [ready_port_before_start_returns, slow_startup_code_fails_the_start,
     crashing_port_fails_the_start, default_start_does_not_wait].

init_per_suite(Config) ->
    ok = pyport_ct_lib:stop_app(),
    [{saved_env, pyport_ct_lib:save_env(?KEYS)} | Config].

end_per_suite(Config) ->
    ok = pyport_ct_lib:stop_app(),
    pyport_ct_lib:restore_env(?config(saved_env, Config)).

init_per_testcase(_Case, Config) ->
    ok = pyport_ct_lib:stop_app(),
    _ = application:load(pyport),
    [application:unset_env(pyport, K) || K <- ?KEYS],
    Config.

end_per_testcase(_Case, _Config) ->
    ok = pyport_ct_lib:stop_app(),
    [application:unset_env(pyport, K) || K <- ?KEYS],
    ok.

%% When start returns, start-up code has run: its effect is visible to the first call.
ready_port_before_start_returns(_Config) ->
    ok = application:set_env(pyport, start_timeout_ms, 20000),
    ok = application:set_env(pyport, startup_code,
                             "import time, builtins\ntime.sleep(0.3)\nbuiltins.pyport_started = True\n"),
    ok = application:start(pyport),
    {ok, #{ready := true}} = py:stats(),
    ?assertEqual({ok, true}, py:eval(<<"pyport_started">>)).

%% Start-up code that outlasts the timeout: the start fails, saying so, and leaves nothing
%% running.
slow_startup_code_fails_the_start(_Config) ->
    ok = application:set_env(pyport, start_timeout_ms, 500),
    ok = application:set_env(pyport, startup_code, "import time\ntime.sleep(60)\n"),
    T0 = erlang:monotonic_time(millisecond),
    ?assertMatch({error, {{pyport_not_ready, #{timeout_ms := 500}}, _}}, application:start(pyport)),
    ?assert(erlang:monotonic_time(millisecond) - T0 < 10000),
    ?assertEqual(undefined, whereis(pyport_server)),
    ?assertEqual(undefined, whereis(pyport_sup)).

%% A port program that keeps dying: the reason carries its last exit.
crashing_port_fails_the_start(_Config) ->
    ok = application:set_env(pyport, start_timeout_ms, 1000),
    ok = application:set_env(pyport, pyport_executable, "/bin/false"),
    ?assertMatch({error, {{pyport_not_ready, #{last_exit := {exit_status, 1}}}, _}},
                 application:start(pyport)).

%% Without the setting, start returns at once even when no port can come up (calls then
%% get {error, {pyport_exit | pyport_unavailable, _}} until one does).
default_start_does_not_wait(_Config) ->
    ok = application:set_env(pyport, pyport_executable, "/bin/false"),
    T0 = erlang:monotonic_time(millisecond),
    ok = application:start(pyport),
    ?assert(erlang:monotonic_time(millisecond) - T0 < 5000),
    ?assert(is_pid(whereis(pyport_server))).
