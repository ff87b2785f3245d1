%% @doc What observability tools see of pyport: telemetry events (with the stand-in
%% `telemetry' of test/support/telemetry.erl, loaded into this VM, since the library
%% cannot be fetched here) and the labels of pyport's processes.
-module(observability_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2, end_per_testcase/2]).
-export([without_telemetry_nothing_is_emitted_and_nothing_fails/1,
         call_span_start_and_stop/1, eval_and_exec_spans_name_the_first_line/1,
         an_error_result_is_a_stop_with_its_reason/1,
         an_argument_error_is_an_exception_event/1,
         a_handler_that_crashes_or_a_vanished_module_costs_the_caller_nothing/1,
         shared_dict_operations_are_sampled_per_kind/1,
         port_exit_and_start_events/1, restart_is_an_exit_with_reason_restart/1,
         processes_are_labelled/1]).

all() -> [without_telemetry_nothing_is_emitted_and_nothing_fails,
          call_span_start_and_stop, eval_and_exec_spans_name_the_first_line,
          an_error_result_is_a_stop_with_its_reason, an_argument_error_is_an_exception_event,
          a_handler_that_crashes_or_a_vanished_module_costs_the_caller_nothing,
          shared_dict_operations_are_sampled_per_kind,
          port_exit_and_start_events, restart_is_an_exit_with_reason_restart,
          processes_are_labelled].

-define(EVENTS, [[pyport, K, P] || K <- [call, eval, exec], P <- [start, stop, exception]]
                ++ [[pyport, shared_dict, operation], [pyport, port, start], [pyport, port, exit]]).

init_per_suite(Config) ->
    Checkout = filename:dirname(filename:dirname(filename:absname(?config(data_dir, Config)))),
    [{standin, filename:join([Checkout, "test", "support", "telemetry.erl"])} | Config].

end_per_suite(_Config) ->
    unload_telemetry(),
    pyport_ct_lib:stop_app().

%% Every case but the first runs with the stand-in loaded before pyport starts (pyport
%% looks for telemetry at its start) and a handler that sends each event here.
init_per_testcase(without_telemetry_nothing_is_emitted_and_nothing_fails, Config) ->
    unload_telemetry(),
    ok = pyport_ct_lib:restart_app(),
    Config;
init_per_testcase(Case, Config) ->
    Saved = pyport_ct_lib:save_env([telemetry_shared_dict_sample]),
    Case =:= shared_dict_operations_are_sampled_per_kind
        andalso application:set_env(pyport, telemetry_shared_dict_sample, 3),
    {ok, telemetry, Beam} = compile:file(?config(standin, Config), [binary]),
    {module, telemetry} = code:load_binary(telemetry, "telemetry.erl", Beam),
    ok = pyport_ct_lib:restart_app(),
    Self = self(),
    ok = telemetry:attach_many(?MODULE, ?EVENTS,
                               fun(E, M, Meta, _) -> Self ! {event, E, M, Meta} end, nil),
    [{saved, Saved} | Config].

end_per_testcase(_Case, Config) ->
    catch telemetry:detach(?MODULE),
    case ?config(saved, Config) of
        undefined -> ok;
        Saved -> pyport_ct_lib:restore_env(Saved)
    end,
    ok.

unload_telemetry() ->
    code:purge(telemetry), code:delete(telemetry), code:purge(telemetry).

%% No telemetry module: the hooks are off, calls, SharedDict operations and a port
%% restart work, and nothing reaches anyone.
without_telemetry_nothing_is_emitted_and_nothing_fails(_Config) ->
    ?assertEqual(non_existing, code:which(telemetry)),
    ?assertNot(pyport_telemetry:enabled()),
    {ok, 2.0} = py:call(math, sqrt, [4.0]),
    ok = py:exec(<<"x = 1">>),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    1 = py:shared_dict_get(SD, <<"k">>),
    ok = py:restart(),
    {ok, 2} = py:eval(<<"1 + 1">>),
    pyport_ct_lib:assert_mailbox_empty().

call_span_start_and_stop(_Config) ->
    ?assert(pyport_telemetry:enabled()),
    {ok, #{os_pid := OsPid}} = py:stats(),
    {ok, 3.0} = py:call("math", <<"sqrt">>, [9.0]),
    {Start, StartMeta} = event([pyport, call, start]),
    {Stop, StopMeta} = event([pyport, call, stop]),
    #{module := <<"math">>, function := <<"sqrt">>, caller := Caller,
      telemetry_span_context := Ctx} = StartMeta,
    ?assertEqual(self(), Caller),
    ?assertMatch([monotonic_time], maps:keys(Start)),
    ?assertEqual(StartMeta#{result => ok, port_os_pid => OsPid}, StopMeta),
    #{duration := D, monotonic_time := StopT} = Stop,
    ?assert(D > 0),
    ?assertEqual(StopT - maps:get(monotonic_time, Start), D),
    ?assert(is_reference(Ctx)),
    pyport_ct_lib:assert_mailbox_empty().

%% eval and exec name their code's first line (cut at 200 bytes).
eval_and_exec_spans_name_the_first_line(_Config) ->
    {ok, 2} = py:eval("1 + 1"),
    {_, #{code := <<"1 + 1">>}} = event([pyport, eval, start]),
    {_, #{code := <<"1 + 1">>, result := ok}} = event([pyport, eval, stop]),
    Long = binary:copy(<<"a">>, 300),
    ok = py:exec(<<Long/binary, " = 1\nb = 2\n">>),
    {_, #{code := Code}} = event([pyport, exec, start]),
    ?assertEqual(binary:copy(<<"a">>, 200), Code),
    {_, #{result := ok}} = event([pyport, exec, stop]).

an_error_result_is_a_stop_with_its_reason(_Config) ->
    {error, {python, 'ZeroDivisionError', _, _} = Reason} = py:eval(<<"1 / 0">>),
    {_, #{result := error, error := Reason}} = event([pyport, eval, stop]),
    {error, timeout} = py:call(time, sleep, [0.3], #{}, 20),
    {_, #{result := error, error := timeout}} = event([pyport, call, stop]).

%% An argument error raised inside the span (an improper list passes call's guard).
an_argument_error_is_an_exception_event(_Config) ->
    ?assertError(badarg, py:call(math, sqrt, [1 | 2])),
    {_, #{module := <<"math">>}} = event([pyport, call, start]),
    {#{duration := _}, #{kind := error, reason := badarg, stacktrace := [_ | _]}} =
        event([pyport, call, exception]),
    %% A bad argument that the guard refuses never enters the span.
    ?assertError(badarg, py:call(math, sqrt, not_a_list)),
    pyport_ct_lib:assert_mailbox_empty().

%% A handler that raises is the telemetry library's business; a telemetry module
%% that disappears while pyport runs is pyport's: either way the call answers.
a_handler_that_crashes_or_a_vanished_module_costs_the_caller_nothing(_Config) ->
    ok = telemetry:attach(crasher, [pyport, call, stop], fun(_, _, _, _) -> error(boom) end, nil),
    {ok, 2.0} = py:call(math, sqrt, [4.0]),
    _ = event([pyport, call, stop]),
    unload_telemetry(),
    {ok, 3.0} = py:call(math, sqrt, [9.0]),
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_destroy(SD).

%% telemetry_shared_dict_sample 3 (set by init_per_testcase): of 7 gets, the 3rd and
%% the 6th are emitted, each standing for 3; other kinds count on their own.
shared_dict_operations_are_sampled_per_kind(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, 1),
    [1 = py:shared_dict_get(SD, <<"k">>) || _ <- lists:seq(1, 7)],
    {M1, #{op := get, sample_rate := 3, result := ok, caller := Self}} =
        event([pyport, shared_dict, operation]),
    ?assertEqual(self(), Self),
    ?assertMatch(#{count := 3, duration := D} when D > 0, M1),
    {#{count := 3}, #{op := get}} = event([pyport, shared_dict, operation]),
    [ok = py:shared_dict_set(SD, <<"k">>, 2) || _ <- lists:seq(1, 2)],  % the 3rd set
    {_, #{op := set}} = event([pyport, shared_dict, operation]),
    ok = py:shared_dict_destroy(SD),
    %% An operation that raises is counted too.
    [catch py:shared_dict_get(SD, <<"k">>) || _ <- lists:seq(1, 2)],
    {_, #{op := get, result := exception}} = event([pyport, shared_dict, operation]),
    pyport_ct_lib:assert_mailbox_empty().

%% A port killed from outside: an exit event with its status, then a start event of
%% the next generation.
port_exit_and_start_events(_Config) ->
    {ok, #{os_pid := OsPid, generation := Gen}} = py:stats(),
    os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    {#{pending := 0, system_time := _},
     #{index := 1, os_pid := OsPid, generation := Gen, reason := {exit_status, 137}}} =
        event([pyport, port, exit]),
    {#{system_time := _}, #{index := 1, os_pid := NewPid, generation := NewGen}} =
        event([pyport, port, start]),
    ?assert(NewGen > Gen),
    ok = pyport_ct_lib:wait_ready(),
    {ok, #{os_pid := NewPid}} = py:stats().

restart_is_an_exit_with_reason_restart(_Config) ->
    ok = py:restart(),
    {_, #{reason := restart}} = event([pyport, port, exit]),
    {_, #{index := 1}} = event([pyport, port, start]).

%% Labels in the process dictionary (where OTP 27's proc_lib:set_label/1 puts them),
%% and an $initial_call that names each process's module.
processes_are_labelled(_Config) ->
    Server = whereis(pyport_server),
    ?assertEqual({pyport_server, 1}, label(Server)),
    {links, Links} = process_info(Server, links),
    [Sender] = [P || P <- Links, is_pid(P), label(P) =:= pyport_sender],
    ?assertEqual({pyport_sender, init, 0}, initial_call(Sender)),
    Self = self(),
    %% A callback's process lives while it runs: it looks at itself.
    ok = py:register_function(whoami, fun([]) -> Self ! {callback, label(self())}, ok end),
    {ok, <<"ok">>} = py:eval(<<"erlang.whoami()">>),
    receive {callback, L} -> ?assertEqual({pyport_callback, <<"whoami">>}, L)
    after 5000 -> error(no_callback)
    end,
    Ref = py:spawn_call(time, sleep, [0.2]),
    [Holder] = [P || P <- processes(), label(P) =:= {pyport_async, call, {<<"time">>, <<"sleep">>}}],
    ?assertEqual({pyport_async, holder, 1}, initial_call(Holder)),
    {ok, undefined} = py:await(Ref),
    ok = py:unregister_function(whoami),
    _ = [event(E) || E <- [[pyport, eval, start], [pyport, eval, stop]]].

label(Pid) ->
    case process_info(Pid, dictionary) of
        {dictionary, D} -> proplists:get_value('$process_label', D);
        undefined -> undefined
    end.

initial_call(Pid) ->
    {dictionary, D} = process_info(Pid, dictionary),
    proplists:get_value('$initial_call', D).

%% The next event named Event (others of the same test stay queued in order).
event(Event) ->
    receive {event, Event, M, Meta} -> {M, Meta}
    after 5000 -> ct:fail({no_event, Event, process_info(self(), messages)})
    end.
