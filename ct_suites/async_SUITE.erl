%% @doc Asynchronous calls: py:spawn_call/3,4 + py:await/1,2 and py:cast/3,4.
%%
%% The Python work used here (module `pyport_async_ct', made by init_per_suite)
%% records in a module global that it started, how far it counted, whether it
%% ran to its end and whether its `finally' clause ran: `exited' without
%% `finished' proves the loop was interrupted. The loops are given 60 s, far
%% longer than any bound waited for here, so a loop that is not interrupted
%% fails the case instead of ending by itself.
-module(async_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([await_returns_what_call_returns/1, arguments_checked_like_call/1,
         many_outstanding_awaited_in_reverse/1, await_timeout_interrupts_python/1,
         await_from_another_process_is_badarg/1, await_twice_is_badarg/1,
         unawaited_work_cancelled_at_call_timeout/1, dead_caller_cancels_work/1,
         cast_runs_the_call/1, failing_cast_logs_a_warning/1,
         namespace_is_the_callers/1, readme_example/1,
         unavailable_port_same_reason_as_call/1]).
%% logger handler callback (failing_cast_logs_a_warning)
-export([log/2]).

-import(pyport_ct_lib, [wait_until/3, assert_mailbox_empty/0, run_in_process/1, has/2]).

-define(LIVENESS_MS, 10000).
%% How long a "nothing arrives" check waits.
-define(QUIET_MS, 1000).

-define(MOD_PY, <<"
import sys, types
if 'pyport_async_ct' not in sys.modules:
    _m = types.ModuleType('pyport_async_ct')
    exec('''
import time
state = {}

def reset(name):
    state[name] = {'started': False, 'count': 0, 'finished': False, 'exited': False}
    return True

def get(name):
    return state.get(name)

def put(name, value):
    state[name] = value
    return value

def spin(name, secs):
    s = state[name]
    s['started'] = True
    try:
        end = time.monotonic() + secs
        while time.monotonic() < end:
            s['count'] += 1
            time.sleep(0.005)
        s['finished'] = True
    finally:
        s['exited'] = True
    return 'finished'

def square(i):
    time.sleep(0.001)
    return i * i

def fail(msg):
    raise ValueError(msg)
''', _m.__dict__)
    sys.modules['pyport_async_ct'] = _m
">>).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [await_returns_what_call_returns,
     arguments_checked_like_call,
     many_outstanding_awaited_in_reverse,
     await_timeout_interrupts_python,
     await_from_another_process_is_badarg,
     await_twice_is_badarg,
     unawaited_work_cancelled_at_call_timeout,
     dead_caller_cancels_work,
     cast_runs_the_call,
     failing_cast_logs_a_warning,
     namespace_is_the_callers,
     readme_example,
     unavailable_port_same_reason_as_call].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    ok = load_module(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

init_per_testcase(_Case, Config) ->
    [{saved_env, pyport_ct_lib:save_env([call_timeout])} | Config].

end_per_testcase(_Case, Config) ->
    _ = logger:remove_handler(async_ct_logs),
    pyport_ct_lib:restore_env(?config(saved_env, Config)),
    ok.

%%--------------------------------------------------------------------
%% Results

%% await returns exactly what py:call returns: a value, a Python exception
%% (the same reason, traceback included), other errors, with kwargs as a map
%% or a keyword list.
await_returns_what_call_returns(_Config) ->
    {ok, 4.0} = py:await(py:spawn_call(math, sqrt, [16])),
    {ok, 3.0} = py:await(py:spawn_call(<<"math">>, "sqrt", [9]), ?LIVENESS_MS),
    {ok, [3, 2, 1]} = py:await(py:spawn_call(builtins, sorted, [[1, 3, 2]], #{reverse => true})),
    {error, {python, 'ValueError', <<"boom">>, _}} =
        py:await(py:spawn_call(pyport_async_ct, fail, [<<"boom">>])),
    Calls = [{math, sqrt, [16], #{}},
             {builtins, sorted, [[1, 3, 2]], #{reverse => true}},
             {builtins, sorted, [[1, 3, 2]], [{reverse, true}]},
             {builtins, int, [<<"x">>], #{}},
             {pyport_async_ct, fail, [<<"boom">>], #{}},
             {builtins, no_such_function, [], #{}},
             {builtins, 'True', [], #{}}],
    lists:foreach(fun({M, F, A, K}) ->
                          Sync = py:call(M, F, A, K),
                          ?assertEqual({M, F, Sync}, {M, F, py:await(py:spawn_call(M, F, A, K))})
                  end, Calls),
    assert_mailbox_empty().

%% spawn_call and cast raise badarg at the call site where py:call does; await
%% raises badarg for what is not a reference or not a timeout.
arguments_checked_like_call(_Config) ->
    Bad = [{1, f, [], #{}},
           {math, <<255>>, [], #{}},
           {math, sqrt, [1 | 2], #{}},
           {math, sqrt, not_a_list, #{}},
           {math, sqrt, [], not_kwargs},
           {math, sqrt, [], #{1 => 2}},
           {math, sqrt, [], #{a => 1, <<"a">> => 2}},
           {math, sqrt, [], [{a, 1}, {a, 2}]}],
    lists:foreach(fun({M, F, A, K}) ->
                          ?assertError(badarg, py:call(M, F, A, K)),
                          ?assertError(badarg, py:spawn_call(M, F, A, K)),
                          ?assertError(badarg, py:cast(M, F, A, K))
                  end, Bad),
    ?assertError(badarg, py:spawn_call(1, f, [])),
    ?assertError(badarg, py:cast(1, f, [])),
    ?assertError(badarg, py:await(make_ref())),
    ?assertError(badarg, py:await(not_a_ref, 100)),
    Ref = py:spawn_call(math, sqrt, [4]),
    ?assertError(badarg, py:await(Ref, -1)),
    ?assertError(badarg, py:await(Ref, forever)),
    %% a refused await leaves the reference usable
    {ok, 2.0} = py:await(Ref),
    assert_mailbox_empty().

%% 200 calls outstanding at once, awaited last first: each answers its own.
many_outstanding_awaited_in_reverse(_Config) ->
    Seq = lists:seq(1, 200),
    Refs = [py:spawn_call(pyport_async_ct, square, [I]) || I <- Seq],
    Results = [py:await(R) || R <- lists:reverse(Refs)],
    ?assertEqual([{ok, I * I} || I <- lists:reverse(Seq)], Results),
    assert_mailbox_empty().

%%--------------------------------------------------------------------
%% Timeouts and cancellation

%% An await that times out returns {error, timeout} and interrupts the Python
%% loop (its `finally' runs, it never finishes, its counter stops); no reply
%% ever comes to the mailbox.
await_timeout_interrupts_python(_Config) ->
    Name = <<"await_timeout">>,
    {ok, true} = py:call(pyport_async_ct, reset, [Name]),
    Ref = py:spawn_call(pyport_async_ct, spin, [Name, 60]),
    wait_for(Name, <<"started">>),
    {error, timeout} = py:await(Ref, 200),
    wait_for(Name, <<"exited">>),
    #{<<"finished">> := false, <<"count">> := Count} = state(Name),
    assert_quiet(),
    #{<<"count">> := Count} = state(Name),
    ok.

%% Only the process that made a reference may await it; another one's await
%% raises badarg and takes nothing away from the owner.
await_from_another_process_is_badarg(_Config) ->
    Ref = py:spawn_call(math, sqrt, [4]),
    badarg = run_in_process(fun() -> try py:await(Ref) catch error:badarg -> badarg end end),
    badarg = run_in_process(fun() -> try py:await(Ref, 0) catch error:badarg -> badarg end end),
    {ok, 2.0} = py:await(Ref),
    assert_mailbox_empty().

%% A reference is awaited once: after its result, and after an await that
%% timed out, a second await raises badarg.
await_twice_is_badarg(_Config) ->
    Ref = py:spawn_call(math, sqrt, [4]),
    {ok, 2.0} = py:await(Ref),
    ?assertError(badarg, py:await(Ref)),
    Name = <<"await_twice">>,
    {ok, true} = py:call(pyport_async_ct, reset, [Name]),
    Slow = py:spawn_call(pyport_async_ct, spin, [Name, 60]),
    wait_for(Name, <<"started">>),
    {error, timeout} = py:await(Slow, 50),
    ?assertError(badarg, py:await(Slow)),
    wait_for(Name, <<"exited">>),
    assert_mailbox_empty().

%% Work nobody awaits is cancelled in the port at call_timeout; neither it nor
%% work that finished in time leaves a message in the mailbox. Awaited later,
%% the one is {error, timeout}, the other its result.
unawaited_work_cancelled_at_call_timeout(_Config) ->
    ok = application:set_env(pyport, call_timeout, 1000),
    Name = <<"unawaited">>,
    {ok, true} = py:call(pyport_async_ct, reset, [Name]),
    Slow = py:spawn_call(pyport_async_ct, spin, [Name, 60]),
    Quick = py:spawn_call(math, sqrt, [9]),
    wait_for(Name, <<"exited">>),
    #{<<"started">> := true, <<"finished">> := false} = state(Name),
    assert_quiet(),
    {error, timeout} = py:await(Slow, 0),
    {ok, 3.0} = py:await(Quick, 0),
    ok.

%% A caller that dies cancels the work it started.
dead_caller_cancels_work(_Config) ->
    Name = <<"dead_caller">>,
    {ok, true} = py:call(pyport_async_ct, reset, [Name]),
    Caller = spawn(fun() ->
                           Ref = py:spawn_call(pyport_async_ct, spin, [Name, 60]),
                           receive never -> Ref end
                   end),
    wait_for(Name, <<"started">>),
    exit(Caller, kill),
    wait_for(Name, <<"exited">>),
    #{<<"finished">> := false} = state(Name),
    ok.

%%--------------------------------------------------------------------
%% cast

%% A cast returns ok at once and runs the call (kwargs form too); nothing is
%% sent to the caller.
cast_runs_the_call(_Config) ->
    ok = py:cast(pyport_async_ct, put, [<<"cast1">>, 7]),
    ok = py:cast(pyport_async_ct, put, [<<"cast2">>], #{value => 8}),
    ok = py:cast(pyport_async_ct, put, [<<"cast3">>], [{value, 9}]),
    wait_until(fun() -> {ok, 7} =:= py:call(pyport_async_ct, get, [<<"cast1">>]) end,
               ?LIVENESS_MS, cast1),
    wait_until(fun() -> {ok, 8} =:= py:call(pyport_async_ct, get, [<<"cast2">>]) end,
               ?LIVENESS_MS, cast2),
    wait_until(fun() -> {ok, 9} =:= py:call(pyport_async_ct, get, [<<"cast3">>]) end,
               ?LIVENESS_MS, cast3),
    assert_quiet().

%% A cast that fails is logged as a warning (a Python exception; no answer
%% within call_timeout, whose work is interrupted) and sends nothing to the caller.
failing_cast_logs_a_warning(_Config) ->
    Tab = ets:new(async_ct_logs, [public, duplicate_bag]),
    ok = logger:add_handler(async_ct_logs, ?MODULE, #{config => #{tab => Tab}, level => all}),
    ok = py:cast(pyport_async_ct, fail, [<<"cast-boom-17">>]),
    wait_logged(Tab, [<<"py:cast(pyport_async_ct, fail">>, <<"ValueError">>, <<"cast-boom-17">>]),
    ok = application:set_env(pyport, call_timeout, 500),
    Name = <<"cast_timeout">>,
    {ok, true} = py:call(pyport_async_ct, reset, [Name]),
    ok = py:cast(pyport_async_ct, spin, [Name, 60]),
    wait_logged(Tab, [<<"py:cast(pyport_async_ct, spin">>, <<"timeout">>]),
    wait_for(Name, <<"exited">>),
    #{<<"finished">> := false} = state(Name),
    assert_quiet().

%%--------------------------------------------------------------------
%% Namespace

%% The call runs in the caller's namespace (not in that of a process that
%% waits for it on the caller's behalf), for spawn_call and cast alike.
namespace_is_the_callers(_Config) ->
    ok = py:exec(<<"def f(): return 42">>),
    {ok, 42} = py:await(py:spawn_call('__main__', f, [])),
    %% another process has no f
    {error, {python, _, _, _}} =
        run_in_process(fun() -> py:await(py:spawn_call('__main__', f, [])) end),
    ok = py:exec(<<"hits = []\ndef hit(x):\n    hits.append(x)\n">>),
    ok = py:cast('__main__', hit, [1]),
    wait_until(fun() -> {ok, [1]} =:= py:eval(<<"hits">>) end, ?LIVENESS_MS, cast_in_namespace),
    assert_mailbox_empty().

%% With no port program running, await gives what py:call gives, and a
%% cast logs it as a warning.
unavailable_port_same_reason_as_call(_Config) ->
    Tab = ets:new(async_ct_logs, [public, duplicate_bag]),
    ok = logger:add_handler(async_ct_logs, ?MODULE, #{config => #{tab => Tab}, level => all}),
    ok = pyport_ct_lib:stop_app(),
    try
        Reason = {pyport_unavailable, not_started},
        {error, Reason} = py:call(math, sqrt, [4]),
        {error, Reason} = py:await(py:spawn_call(math, sqrt, [4])),
        ok = py:cast(math, sqrt, [4]),
        wait_logged(Tab, [<<"py:cast(math, sqrt">>, <<"not_started">>])
    after
        _ = pyport_ct_lib:start_app(),
        ok = load_module()
    end,
    assert_quiet().

%%--------------------------------------------------------------------
%% README

%% The Erlang block under "Asynchronous calls" in README.md, evaluated as written.
readme_example(_Config) ->
    Readme = filename:join([filename:dirname(code:which(py)), "..", "README.md"]),
    {ok, Text} = file:read_file(Readme),
    [_, After] = binary:split(Text, <<"### Asynchronous calls">>),
    [_, Code0] = binary:split(After, <<"```erlang\n">>),
    [Code | _] = binary:split(Code0, <<"```">>),
    {ok, Tokens, _} = erl_scan:string(binary_to_list(Code)),
    {ok, Exprs} = erl_parse:parse_exprs(Tokens),
    {value, ok, _} = erl_eval:exprs(Exprs, erl_eval:new_bindings()),
    assert_quiet().

%%--------------------------------------------------------------------
%% Helpers

load_module() ->
    {ok, undefined} = py:call(builtins, exec, [?MOD_PY, #{}]),
    ok.

state(Name) ->
    {ok, #{} = S} = py:call(pyport_async_ct, get, [Name]),
    S.

%% Waits until the loop's flag Key is true.
wait_for(Name, Key) ->
    wait_until(fun() ->
                       S = state(Name),
                       maps:get(Key, S) =:= true orelse S
               end, ?LIVENESS_MS, {Name, Key}).

%% Nothing arrives in the mailbox within a generous bound.
assert_quiet() ->
    receive
        Msg -> ct:fail({unexpected_message, Msg})
    after ?QUIET_MS -> ok
    end.

%% Waits until a warning whose text contains every one of Parts was logged.
wait_logged(Tab, Parts) ->
    wait_until(fun() ->
                       lists:any(fun({warning, Text}) -> lists:all(fun(P) -> has(Text, P) end, Parts);
                                    (_) -> false
                                 end, ets:tab2list(Tab))
               end, ?LIVENESS_MS, {warning_logged, Parts}).

%% logger handler: keeps {Level, Text} of every event.
log(#{level := Level, msg := Msg}, #{config := #{tab := Tab}}) ->
    Text = case Msg of
               {report, R} -> iolist_to_binary(io_lib:format("~tp", [R]));
               {string, S} -> unicode:characters_to_binary(S);
               {Format, Args} -> unicode:characters_to_binary(io_lib:format(Format, Args))
           end,
    catch ets:insert(Tab, {Level, Text}),
    ok.
