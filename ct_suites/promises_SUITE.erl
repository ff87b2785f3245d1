%% Documented promises of the Erlang side that no other suite pins: where the
%% binary is found, SharedDict operations raising `{pyport_timeout, SD}' and
%% `{pyport_unavailable, _}', and the capped restart back-off of a crash loop
%% (README "SharedDict", "Failure semantics", "Configuration"), and the
%% `trace_latency' report of py:stats().
-module(promises_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([documented_defaults/1, binary_found_next_to_ebin/1, shared_dict_timeout_raises/1,
         crash_loop_backs_off_capped_and_reports_unavailable/1,
         stats_report_latency_trace/1]).

-define(ENV_KEYS, [pyport_executable, shared_dict_timeout, restart_backoff_max, trace_latency]).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [documented_defaults, binary_found_next_to_ebin, shared_dict_timeout_raises,
     crash_loop_backs_off_capped_and_reports_unavailable, stats_report_latency_trace].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

init_per_testcase(_Case, Config) ->
    [{saved_env, pyport_ct_lib:save_env(?ENV_KEYS)} | Config].

end_per_testcase(_Case, Config) ->
    pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config)).

%% README "Configuration": the defaults the application file ships with.
documented_defaults(_Config) ->
    {ok, [{application, pyport, Props}]} = file:consult(code:where_is_file("pyport.app")),
    Env = proplists:get_value(env, Props),
    [?assertEqual({K, V}, {K, proplists:get_value(K, Env)})
     || {K, V} <- [{workers, 1}, {max_workers, 16}, {call_timeout, 30000},
                   {shared_dict_timeout, 5000}, {restart_backoff_max, 5000},
                   {sys_path, []}, {startup_code, ""}, {max_in_flight, 10000}]],
    ok.

%% README: "The binary is found in code:priv_dir(pyport), or next to ebin/ when
%% the checkout's folder has another name" (this worktree's folder is not named
%% pyport, so the second way is the one taken here).
binary_found_next_to_ebin(_Config) ->
    ok = pyport_ct_lib:stop_app(),
    ok = application:unset_env(pyport, pyport_executable),
    _ = pyport_ct_lib:start_app(),
    Ebin = filename:dirname(code:which(pyport_server)),
    Expected = filename:join([filename:dirname(Ebin), "priv", "pyport"]),
    ?assertEqual(Expected, pyport_server:executable()),
    %% and it is that launcher that runs: the port (the interpreter it started) has the
    %% extension module next to it loaded
    OsPid = pyport_ct_lib:stat(os_pid),
    {ok, Maps} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/maps"),
    Module = filename:join(filename:dirname(Expected), "pyport_core.abi3.so"),
    ?assertNotEqual(nomatch, binary:match(Maps, list_to_binary(Module))),
    ok.

%% README: a SharedDict operation that gets no answer within shared_dict_timeout
%% raises error({pyport_timeout, SD}). The port is stopped (SIGSTOP) meanwhile.
shared_dict_timeout_raises(_Config) ->
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, shared_dict_timeout, 300),
    _ = pyport_ct_lib:start_app(),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    OsPid = integer_to_list(pyport_ct_lib:stat(os_pid)),
    _ = os:cmd("kill -STOP " ++ OsPid),
    try
        ?assertError({pyport_timeout, SD}, py:shared_dict_get(SD, <<"k">>)),
        ?assertError({pyport_timeout, SD}, py:shared_dict_keys(SD))
    after
        os:cmd("kill -CONT " ++ OsPid)
    end,
    %% the port lives on, and so does the dict
    1 = py:shared_dict_get(SD, <<"k">>),
    ok = py:shared_dict_destroy(SD).

%% README: while the port keeps crashing, restarts back off exponentially (up to
%% restart_backoff_max) and calls return {error, {pyport_unavailable,
%% {exit_status, S}}}; SharedDict operations raise error({pyport_unavailable, _}).
%% The "port" here is the real binary with a flag it refuses: exit status 2.
crash_loop_backs_off_capped_and_reports_unavailable(Config) ->
    Script = filename:join(?config(priv_dir, Config), "pyport_bad_flag.sh"),
    Real = filename:join([filename:dirname(filename:dirname(code:which(pyport_server))),
                          "priv", "pyport"]),
    ok = file:write_file(Script, ["#!/bin/sh\nexec '", Real, "' --no-such-flag \"$@\"\n"]),
    ok = file:change_mode(Script, 8#755),
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, pyport_executable, Script),
    ok = application:set_env(pyport, restart_backoff_max, 200),
    {ok, _} = application:ensure_all_started(pyport),
    pyport_ct_lib:wait_until(fun() -> local(last_exit) =:= {exit_status, 2} end, 10000,
                             bad_command_line_exit_status_2),
    %% calls are told the port is unavailable, with the last exit status (a call
    %% may also catch a port in its short life: that one gets pyport_exit, with
    %% the status, or epipe when the VM wrote to it before it read the status)
    pyport_ct_lib:wait_until(
      fun() ->
              case py:eval(<<"1">>) of
                  {error, {pyport_unavailable, {exit_status, 2}}} -> true;
                  {error, {pyport_exit, 2}} -> false;
                  {error, {pyport_exit, epipe}} -> false;
                  Other -> ct:fail({unexpected_during_crash_loop, Other})
              end
      end, 10000, call_sees_pyport_unavailable),
    pyport_ct_lib:wait_until(
      fun() ->
              try py:shared_dict_new() of
                  Other -> ct:fail({shared_dict_new_during_crash_loop, Other})
              catch
                  error:{pyport_unavailable, {exit_status, 2}} -> true;
                  error:{pyport_unavailable, _} = Why -> ct:fail({wrong_reason, Why})
              end
      end, 10000, shared_dict_new_raises_pyport_unavailable),
    %% The back-off is capped at 200 ms: 12 more restarts come within 10 s
    %% (uncapped, 100 ms doubling, they would take minutes), and it is a back-off:
    %% 12 restarts at 100 ms or more apart take over a second.
    R0 = local(restarts),
    T0 = pyport_ct_lib:now_ms(),
    pyport_ct_lib:wait_until(fun() -> local(restarts) >= R0 + 12 end, 10000,
                             twelve_capped_restarts),
    Elapsed = pyport_ct_lib:now_ms() - T0,
    ct:log("12 restarts in ~b ms with restart_backoff_max = 200", [Elapsed]),
    ?assert(Elapsed >= 1000),
    ok.

local(Key) ->
    maps:get(Key, gen_server:call(pyport_server, stats)).

%% README "Configuration": with `trace_latency => true', py:stats() reports the
%% traced calls as `latency_trace'. Every atom of that report must be one the
%% VM knows before anything else names it (replies are decoded with `[safe]'),
%% so this test names none of them: it compares their text.
stats_report_latency_trace(_Config) ->
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, trace_latency, true),
    _ = pyport_ct_lib:start_app(),
    {ok, _} = py:call(math, sqrt, [2.0]),
    Stats = case py:stats() of
                {ok, S} -> S;
                Other -> ct:fail({stats, Other})
            end,
    [Trace] = [V || {K, V} <- maps:to_list(Stats), is_atom(K),
                    atom_to_binary(K) =:= <<"latency_trace">>],
    Fields = maps:from_list([{atom_to_binary(K), V} || {K, V} <- maps:to_list(Trace)]),
    ?assertEqual([<<"route_ns">>, <<"queue_ns">>, <<"prepare_ns">>, <<"python_ns">>,
                  <<"encode_ns">>, <<"release_ns">>],
                 [atom_to_binary(A) || A <- maps:get(<<"stages">>, Fields)]),
    ?assertMatch([{Id, [_, _, _, _, _, _]} | _] when is_integer(Id), maps:get(<<"calls">>, Fields)).
