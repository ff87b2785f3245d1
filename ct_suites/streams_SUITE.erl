%% @doc Streams: py:stream_start/3,4,5, stream_ack/1,2, stream_cancel/1. Items
%% arrive in order then `done' or `{error, Reason}'; at most `window' items are
%% unacknowledged; a stream out of credit holds no Python thread; cancelling a
%% stream, or its owner's exit, closes the generator (its `finally' runs).
-module(streams_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1, init_per_testcase/2,
         end_per_testcase/2]).
-export([items_then_done/1, error_midway/1, start_error_is_a_call_error/1,
         kwargs_and_owner_option/1, cancel_closes_the_generator/1,
         owner_exit_closes_the_generator/1, window_bounds_the_mailbox/1,
         async_generator_items/1, async_generator_cancel_closes/1,
         blocked_generator_is_interrupted/1, port_exit_ends_the_stream/1,
         waiting_for_credit_holds_no_thread/1, bad_arguments/1]).

-define(GEN, <<"
import threading
closed = {}
def gen(n, tag='x'):
    try:
        for i in range(n):
            yield i
    finally:
        closed[tag] = True
def bad(n):
    for i in range(n):
        yield i
    raise ValueError('broke at %d' % n)
async def agen(n, tag='a'):
    import asyncio
    try:
        for i in range(n):
            await asyncio.sleep(0)
            yield i * 10
    finally:
        closed[tag] = True
def blocked(tag):
    import time
    try:
        yield 'first'
        while True:
            time.sleep(0.05)
    finally:
        closed[tag] = True
def not_iterable():
    return 42
def raises():
    raise KeyError('early')
">>).

all() ->
    [items_then_done, error_midway, start_error_is_a_call_error, kwargs_and_owner_option,
     cancel_closes_the_generator, owner_exit_closes_the_generator,
     window_bounds_the_mailbox, async_generator_items, async_generator_cancel_closes,
     blocked_generator_is_interrupted, port_exit_ends_the_stream,
     waiting_for_credit_holds_no_thread, bad_arguments].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

init_per_testcase(waiting_for_credit_holds_no_thread, Config) ->
    Saved = pyport_ct_lib:save_env([workers, max_workers]),
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, workers, 1),
    ok = application:set_env(pyport, max_workers, 1),
    _ = pyport_ct_lib:start_app(),
    setup([{saved_env, Saved} | Config]);
init_per_testcase(_Case, Config) ->
    setup(Config).

setup(Config) ->
    %% The generators live in a module: a stream's function may be called from any
    %% process, and the test reads `closed' back from another one.
    ok = py:exec(<<"import sys, types\n"
                   "m = types.ModuleType('streams_ct')\n"
                   "exec(code, m.__dict__)\n"
                   "sys.modules['streams_ct'] = m\n">>, #{code => ?GEN}),
    Config.

end_per_testcase(waiting_for_credit_holds_no_thread, Config) ->
    pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config));
end_per_testcase(_Case, _Config) ->
    ok.

%% Every item, in order, then done; nothing after it.
items_then_done(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, gen, [100]),
    ?assert(is_reference(Ref)),
    ?assertEqual({done, lists:seq(0, 99)}, collect(Ref)),
    pyport_ct_lib:assert_mailbox_empty().

%% A generator that raises: the items before, then {error, Reason} shaped like a
%% call's error.
error_midway(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, bad, [3]),
    {error, [0, 1, 2], {python, 'ValueError', <<"broke at 3">>, Tb}} = collect(Ref),
    ?assert(is_binary(Tb)).

%% What fails before there is anything to iterate is the start's error.
start_error_is_a_call_error(_Config) ->
    ?assertMatch({error, {python, 'KeyError', _, _}}, py:stream_start(streams_ct, raises, [])),
    ?assertMatch({error, {python, 'TypeError', _, _}}, py:stream_start(streams_ct, not_iterable, [])),
    pyport_ct_lib:assert_mailbox_empty().

%% Kwargs reach the function; option owner sends the items to another process.
kwargs_and_owner_option(_Config) ->
    Self = self(),
    Owner = spawn_link(fun() ->
                               receive {go, Ref} -> Self ! {got, collect(Ref)} end
                       end),
    {ok, Ref} = py:stream_start(streams_ct, gen, [5], #{tag => <<"kw">>}, #{owner => Owner}),
    Owner ! {go, Ref},
    receive {got, Got} -> ?assertEqual({done, [0, 1, 2, 3, 4]}, Got) end,
    ?assertEqual({ok, true}, py:eval(<<"__import__('streams_ct').closed.get('kw', False)">>)),
    pyport_ct_lib:assert_mailbox_empty().

%% Cancelled midway, the generator is closed: its finally runs, no done comes.
cancel_closes_the_generator(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, gen, [1000000], #{tag => <<"cancel">>}, #{window => 4, flow => ack}),
    receive {py_stream, Ref, {data, 0}} -> ok after 10000 -> ct:fail(no_first_item) end,
    ok = py:stream_cancel(Ref),
    wait_closed(<<"cancel">>),
    ?assertEqual(0, stream_count()),
    %% At most the window's items were sent; none after them, and no done.
    Left = drain(Ref, 0),
    ?assert(Left =< 3, {items_after_the_window, Left}).

%% The owner's exit cancels its streams.
owner_exit_closes_the_generator(_Config) ->
    Owner = spawn(fun() -> receive stop -> ok end end),
    {ok, _Ref} = py:stream_start(streams_ct, gen, [1000000], #{tag => <<"owner">>},
                                 #{owner => Owner, window => 2}),
    exit(Owner, kill),
    wait_closed(<<"owner">>),
    pyport_ct_lib:wait_until(fun() -> stream_count() =:= 0 end, 10000, streams_left).

%% An async generator streams like a generator: its items are awaited.
async_generator_items(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, agen, [50], #{}, #{window => 8}),
    ?assertEqual({done, [I * 10 || I <- lists:seq(0, 49)]}, collect(Ref)),
    ?assertEqual({ok, true}, py:eval(<<"__import__('streams_ct').closed.get('a', False)">>)).

%% Cancelling an async generator runs its finally (aclose).
async_generator_cancel_closes(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, agen, [1000000], #{tag => <<"acancel">>}, #{window => 2}),
    receive {py_stream, Ref, {data, 0}} -> ok after 10000 -> ct:fail(no_first_item) end,
    ok = py:stream_cancel(Ref),
    wait_closed(<<"acancel">>),
    _ = drain(Ref, 0).

%% A generator blocked in next() is interrupted by the cancel, like a call.
blocked_generator_is_interrupted(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, blocked, [<<"blocked">>]),
    receive {py_stream, Ref, {data, <<"first">>}} -> ok after 10000 -> ct:fail(no_first_item) end,
    ok = py:stream_ack(Ref),
    ok = py:stream_cancel(Ref),
    wait_closed(<<"blocked">>),
    pyport_ct_lib:wait_until(fun() -> stream_count() =:= 0 end, 10000, streams_left),
    ?assertEqual(0, drain(Ref, 0)).

%% The port program dies: the owner of a running stream is told, with the reason
%% calls get, instead of waiting for ever.
port_exit_ends_the_stream(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, gen, [1000000], #{}, #{window => 1}),
    receive {py_stream, Ref, {data, 0}} -> ok after 10000 -> ct:fail(no_first_item) end,
    OsPid = pyport_ct_lib:stat(os_pid),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    receive
        {py_stream, Ref, {error, Reason}} -> ?assertEqual({pyport_exit, 137}, Reason)
    after 10000 -> ct:fail(no_error_after_port_exit)
    end,
    ok = pyport_ct_lib:wait_ready().

%% 100,000 items with window 16: the owner's mailbox never holds more than
%% window + 1 messages (the items it has not acknowledged, and done), and the
%% port's memory does not grow with the stream.
window_bounds_the_mailbox(_Config) ->
    OsPid = pyport_ct_lib:stat(os_pid),
    Rss0 = rss_kib(OsPid),
    T0 = erlang:monotonic_time(millisecond),
    {ok, Ref} = py:stream_start(builtins, range, [100000], #{}, #{window => 16, flow => ack}),
    {Count, MaxQueue} = consume(Ref, 0, 0),
    Ms = erlang:monotonic_time(millisecond) - T0,
    Rss1 = rss_kib(OsPid),
    ct:pal("streams: 100000 items in ~b ms, mailbox at most ~b, port RSS ~b -> ~b KiB",
           [Ms, MaxQueue, Rss0, Rss1]),
    ?assertEqual(100000, Count),
    ?assert(MaxQueue =< 17, {mailbox_over_window, MaxQueue}),
    ?assert(Rss1 - Rss0 < 20 * 1024, {rss_growth_kib, Rss1 - Rss0}).

%% With one worker in all, a stream that waits for acknowledgements does not
%% keep it: calls run meanwhile, and the stream resumes on ack.
waiting_for_credit_holds_no_thread(_Config) ->
    {ok, Ref} = py:stream_start(streams_ct, gen, [10], #{}, #{window => 1, flow => ack}),
    receive {py_stream, Ref, {data, 0}} -> ok after 10000 -> ct:fail(no_first_item) end,
    ?assertEqual({ok, 4}, py:eval(<<"2 + 2">>, #{}, 5000)),
    ?assertEqual(1, pyport_ct_lib:stat(workers)),
    ok = py:stream_ack(Ref),
    receive {py_stream, Ref, {data, 1}} -> ok after 10000 -> ct:fail(no_second_item) end,
    ok = py:stream_ack(Ref, 100),
    ?assertEqual({done, lists:seq(2, 9)}, collect(Ref)).

bad_arguments(_Config) ->
    ?assertError(badarg, py:stream_start(streams_ct, gen, [1], #{}, #{window => 0})),
    ?assertError(badarg, py:stream_start(streams_ct, gen, [1], #{}, #{owner => self, window => 1})),
    ?assertError(badarg, py:stream_start(streams_ct, gen, [1], #{}, #{bogus => 1})),
    ?assertError(badarg, py:stream_start(streams_ct, gen, [1], #{}, #{flow => credit})),
    %% stream_start/4's map is options (erlang_python's), not keyword arguments
    ?assertError(badarg, py:stream_start(streams_ct, gen, [1], #{tag => <<"x">>})),
    ?assertError(badarg, py:stream_start(streams_ct, gen, not_a_list)),
    ?assertError(badarg, py:stream_ack(not_a_ref)),
    ?assertError(badarg, py:stream_ack(make_ref(), 0)),
    ?assertError(badarg, py:stream_cancel(42)),
    %% Acknowledging or cancelling a stream that is gone is harmless.
    ok = py:stream_ack(make_ref()),
    ok = py:stream_cancel(make_ref()).

%%====================================================================

collect(Ref) ->
    collect(Ref, []).

collect(Ref, Acc) ->
    receive
        {py_stream, Ref, {data, V}} -> ok = py:stream_ack(Ref), collect(Ref, [V | Acc]);
        {py_stream, Ref, done} -> {done, lists:reverse(Acc)};
        {py_stream, Ref, {error, E}} -> {error, lists:reverse(Acc), E}
    after 10000 -> ct:fail({stream_stalled, Ref, lists:reverse(Acc)})
    end.

consume(Ref, Count, MaxQueue) ->
    {message_queue_len, Q} = process_info(self(), message_queue_len),
    receive
        {py_stream, Ref, {data, _}} -> ok = py:stream_ack(Ref), consume(Ref, Count + 1, max(Q, MaxQueue));
        {py_stream, Ref, done} -> {Count, max(Q, MaxQueue)}
    after 10000 -> ct:fail({stream_stalled, Count})
    end.

drain(Ref, N) ->
    receive
        {py_stream, Ref, {data, _}} -> drain(Ref, N + 1);
        {py_stream, Ref, Other} -> ct:fail({after_cancel, Other})
    after 500 -> N
    end.

wait_closed(Tag) ->
    pyport_ct_lib:wait_until(
      fun() -> py:eval(<<"__import__('streams_ct').closed.get(t, False)">>, #{t => Tag}) =:= {ok, true} end,
      10000, {generator_not_closed, Tag}).

stream_count() ->
    pyport_ct_lib:stat(streams).

rss_kib(OsPid) ->
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    [Line] = [L || L <- binary:split(Status, <<"\n">>, [global]), binary:match(L, <<"VmRSS:">>) =/= nomatch],
    [_, Kib | _] = binary:split(Line, [<<" ">>, <<"\t">>], [global, trim_all]),
    binary_to_integer(Kib).
