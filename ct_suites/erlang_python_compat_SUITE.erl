%% Code written for erlang_python runs on pyport: each case runs, as written,
%% the kind of code erlang_python's documentation and tests show (README "Coming
%% from erlang_python").
%%
%% - streams need no acknowledgements: the documented consumer loop (no
%%   stream_ack) gets every item and `done'; an owner that never receives holds
%%   at most `window' items, and gets the rest once it receives;
%% - stream_start/4 takes options (`#{owner => Pid}');
%% - `erlang' is imported in every namespace, and hasattr/`from erlang import'
%%   follow registration exactly, from any process;
%% - erlang.async_call: fifty in flight at once on one loop, gathered;
%% - py:stream/3,4, py:stream_eval/1,2, py:async_call/await/gather;
%% - logging.info arrives when the VM logs info; py:configure_logging;
%% - erlang.run, erlang.sleep, erlang.Pid, erlang.Ref; none_as none.
-module(erlang_python_compat_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([consumer_loop_without_acks_gets_every_item/1,
         owner_that_never_receives_holds_a_window/1,
         ack_flow_keeps_explicit_credit/1,
         stream_start_4_takes_options/1,
         erlang_is_imported_everywhere/1,
         hasattr_follows_unregister_from_another_process/1,
         fifty_async_calls_in_flight_at_once/1,
         async_call_outside_a_loop_is_a_runtime_error/1,
         stream_and_stream_eval_collect/1,
         async_call_await_and_gather/1,
         logging_info_arrives_when_the_vm_logs_info/1,
         configure_logging_sets_level_and_format/1,
         run_sleep_pid_and_ref/1,
         sleep_is_interrupted_by_the_callers_timeout/1,
         none_as_none/1]).
%% logger handler callback
-export([log/2]).

-define(LIVENESS_MS, 15000).

-define(MODULE_SRC, <<"
import asyncio, erlang

def gen(n):
    for i in range(n):
        yield i

async def gather_doubles(n):
    return await asyncio.gather(*[erlang.async_call('as_double', i) for i in range(n)])

def run_gather(n):
    return erlang.run(gather_doubles(n))

async def fail_async():
    return await erlang.async_call('async_boom')

def async_call_outside():
    try:
        erlang.async_call('as_double', 1)
    except RuntimeError as e:
        return 'RuntimeError'

async def snooze(x):
    await erlang.sleep(0.01)
    return x

def kinds(p, r, other):
    return [isinstance(p, erlang.Pid), isinstance(p, erlang.Ref),
            isinstance(r, erlang.Ref), isinstance(r, erlang.Pid),
            isinstance(other, erlang.Pid), isinstance(other, erlang.Ref)]

async def run_inside():
    coro = snooze(1)
    try:
        return erlang.run(coro)
    finally:
        coro.close()

async def slowly(x, seconds):
    await asyncio.sleep(seconds)
    return x
">>).

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [consumer_loop_without_acks_gets_every_item, owner_that_never_receives_holds_a_window,
     ack_flow_keeps_explicit_credit, stream_start_4_takes_options,
     erlang_is_imported_everywhere, hasattr_follows_unregister_from_another_process,
     fifty_async_calls_in_flight_at_once, async_call_outside_a_loop_is_a_runtime_error,
     stream_and_stream_eval_collect, async_call_await_and_gather,
     logging_info_arrives_when_the_vm_logs_info, configure_logging_sets_level_and_format,
     run_sleep_pid_and_ref, sleep_is_interrupted_by_the_callers_timeout, none_as_none].

init_per_suite(Config) ->
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

case_env(none_as_none) -> [{none_as, none}];
case_env(sleep_is_interrupted_by_the_callers_timeout) -> [{abandon_after_ms, 5000}];
case_env(_) -> [].

init_per_testcase(Case, Config) ->
    Env = case_env(Case),
    Saved = pyport_ct_lib:save_env([python_log_level, python_log_format | [K || {K, _} <- Env]]),
    #{level := Primary} = logger:get_primary_config(),
    case Case of
        logging_info_arrives_when_the_vm_logs_info -> ok = logger:set_primary_config(level, info);
        %% debug events must reach the handler: the VM lets everything through
        configure_logging_sets_level_and_format -> ok = logger:set_primary_config(level, all);
        _ -> ok
    end,
    ok = pyport_ct_lib:stop_app(),
    [ok = application:set_env(pyport, K, V) || {K, V} <- Env],
    _ = pyport_ct_lib:start_app(),
    ok = py:exec(<<"import sys, types\n"
                   "m = types.ModuleType('epcompat')\n"
                   "exec(src, m.__dict__)\n"
                   "sys.modules['epcompat'] = m\n">>, #{src => ?MODULE_SRC}),
    [{saved_env, Saved}, {primary_level, Primary} | Config].

end_per_testcase(_Case, Config) ->
    _ = logger:remove_handler(ep_compat_capture),
    ok = logger:set_primary_config(level, ?config(primary_level, Config)),
    _ = [py:unregister_function(N) || N <- [multiply, add, as_double, async_boom, reg_probe]],
    ok = pyport_ct_lib:stop_app(),
    pyport_ct_lib:restore_env(?config(saved_env, Config)).

%%--------------------------------------------------------------------
%% Streams

%% erlang_python's documented consumer: no stream_ack anywhere. (Before: 64 of
%% the 1000 items, then nothing, for ever.)
consumer_loop_without_acks_gets_every_item(_Config) ->
    {ok, Ref} = py:stream_start(builtins, range, [1000]),
    {ok, Values} = collect_stream(Ref, [], 10000),
    ?assertEqual(lists:seq(0, 999), Values),
    pyport_ct_lib:assert_mailbox_empty().

collect_stream(Ref, Acc, Timeout) ->
    receive
        {py_stream, Ref, {data, Value}} -> collect_stream(Ref, [Value | Acc], Timeout);
        {py_stream, Ref, done} -> {ok, lists:reverse(Acc)};
        {py_stream, Ref, {error, Reason}} -> {error, Reason}
    after Timeout -> {error, timeout}
    end.

%% An owner that never receives holds at most `window' items (the stream waits,
%% holding no Python thread); once it receives, it gets every item and `done'.
owner_that_never_receives_holds_a_window(_Config) ->
    Self = self(),
    Owner = spawn_link(fun() -> receive go -> Self ! {got, collect_stream(receive {ref, R} -> R end, [], 10000)} end end),
    {ok, Ref} = py:stream_start(epcompat, gen, [500], #{}, #{owner => Owner, window => 8}),
    pyport_ct_lib:wait_until(fun() -> queue_len(Owner) >= 8 end, ?LIVENESS_MS, window_filled),
    %% Every chance to send more than it may.
    timer:sleep(300),
    Held = queue_len(Owner),
    ?assert(Held =< 8, {held, Held}),
    ?assertEqual(0, pyport_ct_lib:stat(busy_workers)),
    Owner ! go,
    Owner ! {ref, Ref},
    receive {got, Got} -> ?assertEqual({ok, lists:seq(0, 499)}, Got)
    after ?LIVENESS_MS -> ct:fail(owner_never_got_the_rest)
    end.

%% `flow => ack' keeps explicit credit: without acknowledgements only the window
%% comes, however much the owner receives.
ack_flow_keeps_explicit_credit(_Config) ->
    {ok, Ref} = py:stream_start(epcompat, gen, [100], #{}, #{window => 4, flow => ack}),
    ?assertEqual({error, timeout}, collect_stream(Ref, [], 500)),
    ok = py:stream_ack(Ref, 200),
    {ok, Rest} = collect_stream(Ref, [], 10000),
    ?assertEqual(lists:seq(4, 99), Rest).

%% erlang_python: `py:stream_start(M, F, Args, #{owner => Pid})'. (Before: the
%% owner went to the generator as a keyword argument.)
stream_start_4_takes_options(_Config) ->
    Self = self(),
    Receiver = spawn_link(fun() -> receive {collect, Ref} -> Self ! {values, collect_stream(Ref, [], 10000)} end end),
    {ok, Ref} = py:stream_start(builtins, iter, [[10, 20, 30]], #{owner => Receiver}),
    Receiver ! {collect, Ref},
    receive {values, V} -> ?assertEqual({ok, [10, 20, 30]}, V) after ?LIVENESS_MS -> ct:fail(no_values) end.

queue_len(Pid) ->
    {message_queue_len, N} = process_info(Pid, message_queue_len),
    N.

%%--------------------------------------------------------------------
%% The erlang module

%% erlang.* without an import, in eval and exec of fresh processes; a user's own
%% `erlang' replaces it. (Before: NameError.)
erlang_is_imported_everywhere(_Config) ->
    ok = py:register_function(multiply, fun([A, B]) -> A * B end),
    ok = py:register_function(add, fun([A, B]) -> A + B end),
    {ok, 50} = in_process(fun() -> py:eval(<<"erlang.multiply(5, 10)">>) end),
    {ok, 12} = in_process(fun() -> py:eval(<<"erlang.call('add', 5, 7)">>) end),
    {ok, 5} = in_process(fun() -> ok = py:exec(<<"from erlang import add as my_add\nr = my_add(2, 3)">>),
                                  py:eval(<<"r">>) end),
    {ok, 42} = in_process(fun() -> ok = py:exec(<<"erlang = 42">>), py:eval(<<"erlang">>) end),
    ok.

%% Registration and unregistration from another process are seen at once, both
%% ways, by hasattr and `from erlang import'. (Before: a name once found stayed.)
hasattr_follows_unregister_from_another_process(_Config) ->
    Has = <<"hasattr(__import__('erlang'), 'reg_probe')">>,
    {ok, false} = py:eval(Has),
    ok = in_process(fun() -> py:register_function(reg_probe, fun([X]) -> X * 2 end) end),
    {ok, true} = py:eval(Has),
    {ok, 10} = py:eval(<<"__import__('erlang').reg_probe(5)">>),
    ok = in_process(fun() -> py:unregister_function(reg_probe) end),
    {ok, false} = py:eval(Has),
    {error, {python, 'ImportError', _, _}} = py:exec(<<"from erlang import reg_probe">>),
    ok.

%% Fifty erlang.async_call of one coroutine are in flight at once: the Erlang
%% function answers only once all fifty have called it. Gathered on the port's
%% loop (an async def called with py:call) and with erlang.run on a worker.
fifty_async_calls_in_flight_at_once(_Config) ->
    Expected = [I * 2 || I <- lists:seq(0, 49)],
    [begin
         Counter = counters:new(1, []),
         ok = py:register_function(as_double, fun([X]) ->
                                                      counters:add(Counter, 1, 1),
                                                      wait_for_count(Counter, 50),
                                                      X * 2
                                              end),
         ?assertEqual({ok, Expected}, py:call(epcompat, Function, [50], #{}, ?LIVENESS_MS))
     end || Function <- [gather_doubles, run_gather]],
    ok = py:register_function(async_boom, fun([]) -> error(boom) end),
    {error, {python, <<"erlang.ErlangError">>, Msg, _}} = py:call(epcompat, fail_async, []),
    ?assert(pyport_ct_lib:has(Msg, <<"boom">>)),
    ok.

wait_for_count(Counter, N) ->
    pyport_ct_lib:wait_until(fun() -> counters:get(Counter, 1) >= N end, ?LIVENESS_MS, {all_in_flight, N}).

%% As in erlang_python: erlang.async_call needs a running loop.
async_call_outside_a_loop_is_a_runtime_error(_Config) ->
    {ok, <<"RuntimeError">>} = py:call(epcompat, async_call_outside, []),
    ok.

%%--------------------------------------------------------------------
%% The py names

stream_and_stream_eval_collect(_Config) ->
    {ok, [0, 1, 4, 9, 16]} = py:stream_eval(<<"(x**2 for x in range(5))">>),
    {ok, [0, 1, 2, 3, 4]} = py:stream_eval(<<"iter(range(5))">>),
    {ok, [{0, <<"a">>}, {1, <<"b">>}, {2, <<"c">>}]} = py:stream_eval(<<"enumerate(['a', 'b', 'c'])">>),
    {ok, [3, 4]} = py:stream_eval(<<"(x + k for x in range(2))">>, #{k => 3}),
    {ok, [{1, <<"a">>}, {2, <<"b">>}]} = py:stream(builtins, enumerate, [[<<"a">>, <<"b">>]], #{start => 1}),
    {ok, [0, 1, 2]} = py:stream(epcompat, gen, [3]),
    %% the caller's namespace, as for eval
    ok = py:exec(<<"def mine(n):\n    yield from range(n)\n">>),
    {ok, [0, 1]} = py:stream('__main__', mine, [2]),
    {ok, [0, 1, 2]} = py:stream_eval(<<"mine(3)">>),
    {error, {python, 'TypeError', _, _}} = py:stream_eval(<<"42">>),
    pyport_ct_lib:assert_mailbox_empty().

async_call_await_and_gather(_Config) ->
    Ref = py:async_call(epcompat, slowly, [7, 0.01]),
    {ok, 7} = py:async_await(Ref),
    {ok, 16.0} = py:async_await(py:async_call(math, sqrt, [256]), 5000),
    {ok, [4.0, 3, 9]} = py:async_gather([{math, sqrt, [16]}, {epcompat, slowly, [3, 0.05]},
                                         {builtins, pow, [3, 2]}]),
    {error, {gather_failed, [{2, {python, 'ZeroDivisionError', _, _}}]}} =
        py:async_gather([{operator, truediv, [1, 1]}, {operator, truediv, [1, 0]}]),
    {error, {gather_failed, [{1, timeout}]}} = py:async_gather([{epcompat, slowly, [1, 30]}], 200),
    ?assertError(badarg, py:async_gather([{math, sqrt}])),
    pyport_ct_lib:assert_mailbox_empty().

%%--------------------------------------------------------------------
%% Logging

%% With the VM logging at info, Python's root logger follows: logging.info
%% arrives. (Before: the root logger stayed at WARNING and it never did.)
logging_info_arrives_when_the_vm_logs_info(_Config) ->
    capture(),
    {ok, _} = py:eval(<<"__import__('logging').info('info from python')">>),
    [{info, _}] = events(<<"info from python">>, 1),
    ok.

configure_logging_sets_level_and_format(_Config) ->
    capture(),
    ok = py:configure_logging(#{level => warning}),
    {ok, _} = py:eval(<<"__import__('logging').info('quiet info')">>),
    {ok, _} = py:eval(<<"__import__('logging').warning('loud warning')">>),
    [{warning, _}] = events(<<"loud warning">>, 1),
    [] = events(<<"quiet info">>, 0),
    ok = py:configure_logging(#{level => debug, format => <<"%(levelname)s|%(message)s">>}),
    {ok, _} = py:eval(<<"__import__('logging').debug('formatted')">>),
    [{debug, Text}] = events(<<"formatted">>, 1),
    ?assert(pyport_ct_lib:has(Text, <<"DEBUG|formatted">>), Text),
    %% kept for the next port
    ok = pyport_ct_lib:restart_app(),
    capture(),
    {ok, _} = py:eval(<<"__import__('logging').debug('after restart')">>),
    [{debug, Text2}] = events(<<"after restart">>, 1),
    ?assert(pyport_ct_lib:has(Text2, <<"DEBUG|after restart">>), Text2),
    %% a format Python refuses changes nothing
    {error, {python, 'ValueError', _, _}} = py:configure_logging(#{format => <<"%(bogus">>}),
    {ok, debug} = application:get_env(pyport, python_log_level),
    ?assertError(badarg, py:configure_logging(#{level => loud})),
    ?assertError(badarg, py:configure_logging(#{colour => red})),
    %% back to the VM's level and the plain format
    ok = py:configure_logging(),
    undefined = application:get_env(pyport, python_log_level),
    ok.

capture() ->
    _ = logger:remove_handler(ep_compat_capture),
    ok = logger:add_handler(ep_compat_capture, ?MODULE, #{config => #{pid => self()}, level => all}).

log(#{level := Level, msg := Msg, meta := #{pyport_source := logging}}, #{config := #{pid := Pid}}) ->
    Text = case Msg of
               {string, S} -> unicode:characters_to_binary(S);
               {report, R} -> iolist_to_binary(io_lib:format("~tp", [R]));
               {Format, Args} -> unicode:characters_to_binary(io_lib:format(Format, Args))
           end,
    Pid ! {python_event, Level, Text},
    ok;
log(_Event, _Config) ->
    ok.

%% The captured events whose text contains Part: exactly N of them, after waiting
%% for them (and, for N = 0, after a flush round trip to the port).
events(Part, N) ->
    {ok, _} = py:eval(<<"1">>),
    Deadline = pyport_ct_lib:now_ms() + ?LIVENESS_MS,
    events(Part, N, Deadline, []).

events(_Part, N, _Deadline, Acc) when length(Acc) =:= N, N > 0 ->
    lists:reverse(Acc);
events(Part, N, Deadline, Acc) ->
    Wait = case N of
               0 -> 200;
               _ -> max(0, Deadline - pyport_ct_lib:now_ms())
           end,
    receive
        {python_event, Level, Text} ->
            case pyport_ct_lib:has(Text, Part) of
                true -> events(Part, N, Deadline, [{Level, Text} | Acc]);
                false -> events(Part, N, Deadline, Acc)
            end
    after Wait ->
            lists:reverse(Acc)
    end.

%%--------------------------------------------------------------------
%% erlang.run, erlang.sleep, erlang.Pid, erlang.Ref, none_as

run_sleep_pid_and_ref(_Config) ->
    ok = py:register_function(as_double, fun([X]) -> X * 2 end),
    {ok, [0, 2]} = py:call(epcompat, run_gather, [2]),
    {ok, 5} = py:call(epcompat, snooze, [5]),
    {ok, undefined} = py:eval(<<"erlang.sleep(0.01)">>),
    {ok, [true, false, true, false, false, false]} = py:call(epcompat, kinds, [self(), make_ref(), <<"x">>]),
    {ok, 1} = py:eval(<<"erlang.run(__import__('epcompat').snooze(1))">>),
    %% as asyncio.run: not inside a running loop
    {error, {python, 'RuntimeError', _, _}} = py:call(epcompat, run_inside, []),
    ok.

%% erlang.sleep in a call is interrupted by the call's timeout (time.sleep is not):
%% the caller gets {error, timeout} and the thread is free at once, no write-off.
sleep_is_interrupted_by_the_callers_timeout(_Config) ->
    {error, timeout} = py:eval(<<"erlang.sleep(30)">>, #{}, 300),
    {ok, 4} = py:eval(<<"2 + 2">>, #{}, 2000),
    0 = pyport_ct_lib:stat(abandoned_workers),
    pyport_ct_lib:wait_until(fun() -> pyport_ct_lib:stat(busy_workers) =:= 0 end, 2000, worker_free),
    ok.

none_as_none(_Config) ->
    {ok, none} = py:eval(<<"None">>),
    {ok, [none, 1]} = py:eval(<<"[None, 1]">>),
    {ok, true} = py:eval(<<"x is None">>, #{x => none}),
    ok.

%%--------------------------------------------------------------------

in_process(Fun) ->
    pyport_ct_lib:run_in_process(Fun).
