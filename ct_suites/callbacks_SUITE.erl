%% @doc Python calls Erlang: py:register_function/2,3, py:unregister_function/1 and, in
%% Python, erlang.call / erlang.<name> / `from erlang import name', erlang.send,
%% erlang.self and erlang.whereis.
%%
%% The Python helpers live in module `pyport_cb_ct' (made by load_module/0 after every
%% start of the port). `outcome(fn, *args)' turns what a call did into a tuple the
%% cases match on: ('ok', Value), ('ErlangError', class_, reason, stack),
%% ('UnknownFunction', is_a_LookupError) or (TypeName, str(exc)).
%%
%% Slow Erlang callbacks sleep ?SLOW_MS (10 s), far longer than any bound waited for
%% here: a callback that is not killed shows up as exit reason `normal' after the bound,
%% never as `killed'. Their pid is handed to a watcher process that monitors it before
%% the callback goes on (a handshake), so a kill can never race the monitor.
-module(callbacks_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([nested_request_cancelled_at_its_own_timeout/1,
         outer_cancel_not_taken_back_by_nested_request/1,
         nested_request_cancelled_before_it_starts/1,
         stuck_thread_written_off_once/1,
         fork_in_nested_request/1]).
-export([suite/0, all/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([register_fun_and_mf_three_spellings/1, register_names_refused/1,
         arguments_and_results_convert/1, unregister_gives_unknown_function/1,
         erlang_exceptions_raise_erlang_error/1, callback_runs_in_its_own_process/1,
         ten_levels_on_one_worker/1, ten_levels_from_eight_callers/1,
         callback_from_thread_started_in_call/1, send_to_self_converts/1,
         thousand_messages_in_order/1, send_to_dead_pid_is_no_error/1,
         self_in_call_and_inherited_by_threads/1, whereis_never_creates_atoms/1,
         slow_callback_killed_at_caller_timeout/1, callback_timeout_outside_any_call/1,
         callback_processes_are_forgotten/1, frames_over_max_reply_bytes_are_errors/1]).
%% called by Python through py:register_function/3
-export([add/1]).

-import(pyport_ct_lib, [wait_until/3, has/2, now_ms/0, stat/1]).

-define(LIVENESS_MS, 10000).
%% How long a slow callback sleeps: longer than every bound of this suite.
-define(SLOW_MS, 10000).

-define(MOD_PY, <<"
import sys, types
if 'pyport_cb_ct' not in sys.modules:
    _m = types.ModuleType('pyport_cb_ct')
    exec('''
import threading, time, erlang
state = {}

def get(name):
    return state.get(name)

def outcome(fn, *args):
    try:
        return ('ok', fn(*args))
    except erlang.ErlangError as e:
        return ('ErlangError', e.class_, e.reason, e.stack)
    except erlang.UnknownFunction as e:
        return ('UnknownFunction', isinstance(e, LookupError))
    except BaseException as e:
        return (type(e).__name__, str(e))

def in_thread(fn, *args):
    out = {}
    def run():
        out['r'] = outcome(fn, *args)
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return out.get('r', ('thread did not finish',))

def orphan_outcome(fn, *args):
    erlang._adopt_caller(None)
    return outcome(fn, *args)

def call_slow(name):
    # The handler runs Python code after the cancellation: a second, asynchronous
    # CallCancelled would interrupt it before it records that it finished.
    try:
        return erlang.call('slow')
    except BaseException as e:
        state[name] = type(e).__name__
        n = 0
        for i in range(200000):
            n += i
        state[name + '_handler_done'] = True
        raise

def orphan_calls_slow(name):
    def run():
        erlang._adopt_caller(None)
        t0 = time.monotonic()
        r = outcome(erlang.call, 'slow')
        state[name] = (r[0], time.monotonic() - t0)
    threading.Thread(target=run, daemon=True).start()
    return True

def send_many(pid, n):
    for i in range(n):
        erlang.send(pid, ('seq', i))
    return n
''', _m.__dict__)
    sys.modules['pyport_cb_ct'] = _m
">>).

%% up(n) calls Erlang's down(n), which calls up(n - 1) in the namespace of the process
%% whose call started the chain.
-define(UP_PY, <<"import erlang\ndef up(n):\n    if n == 0:\n        return 0\n    return 1 + erlang.down(n)\n">>).

suite() ->
    [{timetrap, {seconds, 90}}].

all() ->
    [register_fun_and_mf_three_spellings,
     register_names_refused,
     arguments_and_results_convert,
     unregister_gives_unknown_function,
     erlang_exceptions_raise_erlang_error,
     callback_runs_in_its_own_process,
     ten_levels_on_one_worker,
     ten_levels_from_eight_callers,
     nested_request_cancelled_at_its_own_timeout,
     outer_cancel_not_taken_back_by_nested_request,
     nested_request_cancelled_before_it_starts,
     stuck_thread_written_off_once,
     fork_in_nested_request,
     callback_from_thread_started_in_call,
     send_to_self_converts,
     thousand_messages_in_order,
     send_to_dead_pid_is_no_error,
     self_in_call_and_inherited_by_threads,
     whereis_never_creates_atoms,
     slow_callback_killed_at_caller_timeout,
     callback_timeout_outside_any_call,
     callback_processes_are_forgotten,
     frames_over_max_reply_bytes_are_errors].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    ok = load_module(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% One worker and no room for more: a chain that needed a second thread would hang.
case_env(ten_levels_on_one_worker) -> [{workers, 1}, {max_workers, 1}];
case_env(ten_levels_from_eight_callers) -> [{workers, 1}, {max_workers, 1}];
case_env(slow_callback_killed_at_caller_timeout) -> [{workers, 1}, {max_workers, 1}];
case_env(callback_timeout_outside_any_call) -> [{callback_timeout, 300}];
case_env(frames_over_max_reply_bytes_are_errors) -> [{max_reply_bytes, 100000}];
case_env(_) -> [].

init_per_testcase(Case, Config) ->
    case case_env(Case) of
        [] ->
            Config;
        Env ->
            Saved = pyport_ct_lib:save_env([K || {K, _} <- Env]),
            ok = pyport_ct_lib:stop_app(),
            [ok = application:set_env(pyport, K, V) || {K, V} <- Env],
            _ = pyport_ct_lib:start_app(),
            ok = load_module(),
            [{saved_env, Saved} | Config]
    end.

end_per_testcase(_Case, Config) ->
    case ?config(saved_env, Config) of
        undefined ->
            ok;
        Saved ->
            ok = pyport_ct_lib:restore_env_and_restart(Saved),
            ok = load_module()
    end.

load_module() ->
    ok = py:exec(?MOD_PY).

%% What every case's namespace needs.
setup_ns() ->
    ok = py:exec(<<"import erlang, pyport_cb_ct">>).

add([A, B]) -> A + B.

%%--------------------------------------------------------------------
%% Registering and calling

%% A fun and a {Module, Function} are both called with the argument list, through
%% erlang.call('name', ...), erlang.name(...) and `from erlang import name'.
register_fun_and_mf_three_spellings(_Config) ->
    setup_ns(),
    ok = py:register_function(cb_double, fun([X]) -> 2 * X end),
    ok = py:register_function(<<"cb_add">>, ?MODULE, add),
    {ok, 42} = py:eval(<<"erlang.call('cb_double', 21)">>),
    {ok, 7} = py:eval(<<"erlang.call('cb_add', 3, 4)">>),
    {ok, 42} = py:eval(<<"erlang.cb_double(21)">>),
    {ok, 9} = py:eval(<<"erlang.cb_add(4, 5)">>),
    ok = py:exec(<<"from erlang import cb_double, cb_add">>),
    {ok, 10} = py:eval(<<"cb_double(5)">>),
    {ok, 5} = py:eval(<<"cb_add(2, 3)">>),
    %% registering again replaces
    ok = py:register_function(cb_double, fun([X]) -> 3 * X end),
    {ok, 63} = py:eval(<<"erlang.call('cb_double', 21)">>),
    ok = py:unregister_function(cb_double),
    ok = py:unregister_function(cb_add).

%% `$'-names are pyport's own, the empty name is no name: badarg at the call site,
%% and Python's erlang.call refuses `$'-names with ValueError.
register_names_refused(_Config) ->
    setup_ns(),
    F = fun(_) -> ok end,
    ?assertError(badarg, py:register_function('$pyport_whereis', F)),
    ?assertError(badarg, py:register_function(<<"$x">>, ?MODULE, add)),
    ?assertError(badarg, py:register_function(<<>>, F)),
    ?assertError(badarg, py:register_function(cb_f, fun() -> ok end)),
    ?assertError(badarg, py:unregister_function(<<"$x">>)),
    {ok, {<<"ValueError">>, Msg}} =
        py:eval(<<"pyport_cb_ct.outcome(erlang.call, '$pyport_whereis', 'x')">>),
    ?assert(has(Msg, <<"reserved">>)).

%% Arguments arrive converted as Erlang terms; the result comes back through the
%% conversion table (maps, binaries, tuples, bignums, bytes, None).
arguments_and_results_convert(_Config) ->
    setup_ns(),
    Self = self(),
    ok = py:register_function(cb_args, fun(Args) -> Self ! {cb_args, Args}, ok end),
    {ok, <<"ok">>} = py:eval(<<"erlang.call('cb_args', 1, 'a', (1, 2), {'k': [1]}, 2**100, b'x', None, 2.5)">>),
    Args = receive {cb_args, A} -> A after ?LIVENESS_MS -> ct:fail(no_callback_args) end,
    ?assertEqual([1, <<"a">>, {1, 2}, #{<<"k">> => [1]}, 1 bsl 100, <<"x">>, undefined, 2.5], Args),
    ok = py:register_function(cb_conv, fun([]) ->
                                               #{<<"bin">> => <<"text">>, atom_key => {1, two, 3.5},
                                                 big => -(1 bsl 100), raw => <<255, 0>>,
                                                 list => [undefined, true]}
                                       end),
    ok = py:exec(<<"r = erlang.call('cb_conv')\n"
                   "assert type(r) is dict\n"
                   "assert type(r['bin']) is str and r['bin'] == 'text'\n"
                   "assert r['atom_key'] == (1, 'two', 3.5) and type(r['atom_key']) is tuple\n"
                   "assert r['big'] == -2**100\n"
                   "assert r['raw'] == bytes([255, 0])\n"
                   "assert r['list'] == [None, True]\n">>),
    {ok, Back} = py:eval(<<"r">>),
    ?assertEqual(#{<<"bin">> => <<"text">>, <<"atom_key">> => {1, <<"two">>, 3.5},
                   <<"big">> => -(1 bsl 100), <<"raw">> => <<255, 0>>,
                   <<"list">> => [undefined, true]}, Back),
    ok = py:unregister_function(cb_args),
    ok = py:unregister_function(cb_conv).

%% After unregister_function, erlang.call raises erlang.UnknownFunction (a
%% LookupError), and the name is no attribute of the module any more (hasattr,
%% `from erlang import'), exactly as for a name never registered; a function
%% object fetched before raises UnknownFunction when called.
unregister_gives_unknown_function(_Config) ->
    setup_ns(),
    ok = py:register_function(cb_gone, fun([]) -> here end),
    {ok, <<"here">>} = py:eval(<<"erlang.cb_gone()">>),
    {ok, true} = py:eval(<<"hasattr(erlang, 'cb_gone')">>),
    ok = py:exec(<<"fetched = erlang.cb_gone">>),
    ok = py:unregister_function(cb_gone),
    ok = py:unregister_function(cb_gone),                 % again: still ok
    {ok, {<<"UnknownFunction">>, true}} = py:eval(<<"pyport_cb_ct.outcome(erlang.call, 'cb_gone')">>),
    {ok, {<<"UnknownFunction">>, true}} = py:eval(<<"pyport_cb_ct.outcome(fetched)">>),
    {ok, false} = py:eval(<<"hasattr(erlang, 'cb_gone')">>),
    {ok, {<<"ImportError">>, _}} =
        py:eval(<<"pyport_cb_ct.outcome(exec, 'from erlang import cb_gone', {})">>),
    {ok, false} = py:eval(<<"hasattr(erlang, 'cb_never_registered')">>),
    {ok, {<<"ImportError">>, _}} =
        py:eval(<<"pyport_cb_ct.outcome(exec, 'from erlang import cb_never_registered', {})">>).

%% An Erlang function that raises gives erlang.ErlangError with class_ the class and a
%% reason text that contains the reason.
erlang_exceptions_raise_erlang_error(_Config) ->
    setup_ns(),
    ok = py:register_function(cb_raise, fun([<<"error">>]) -> error(cb_error_reason);
                                           ([<<"exit">>]) -> exit(cb_exit_reason);
                                           ([<<"throw">>]) -> throw(cb_thrown)
                                        end),
    Expect = [{<<"error">>, <<"cb_error_reason">>}, {<<"exit">>, <<"cb_exit_reason">>},
              {<<"throw">>, <<"cb_thrown">>}],
    lists:foreach(
      fun({Class, Reason}) ->
              {ok, {<<"ErlangError">>, C, R, Stack}} =
                  py:eval(<<"pyport_cb_ct.outcome(erlang.call, 'cb_raise', c)">>, #{c => Class}),
              ?assertEqual(Class, C),
              ?assert(has(R, Reason)),
              ?assert(is_binary(Stack))
      end, Expect),
    %% an ordinary Exception: `except Exception' catches it
    {ok, true} = py:eval(<<"issubclass(erlang.ErlangError, Exception)">>),
    ok = py:unregister_function(cb_raise).

%% The function runs in a process of its own: neither the caller nor the server.
callback_runs_in_its_own_process(_Config) ->
    setup_ns(),
    ok = py:register_function(cb_whoami, fun([]) -> self() end),
    {ok, P} = py:eval(<<"erlang.call('cb_whoami')">>),
    ?assert(is_pid(P)),
    ?assertNotEqual(self(), P),
    ?assertNotEqual(whereis(pyport_server), P),
    ok = py:unregister_function(cb_whoami).

%%--------------------------------------------------------------------
%% Reentrancy

%% Python up(10) → Erlang down → Python up(9) → … ten levels deep on a port with one
%% worker and no room for a second: the nested calls run on the thread that waits.
ten_levels_on_one_worker(_Config) ->
    ok = py:register_function(down, fun down/1),
    ok = py:exec(?UP_PY),
    {ok, 10} = py:call('__main__', up, [10], #{}, ?LIVENESS_MS),
    ?assertEqual(1, stat(workers)),
    ok = py:unregister_function(down).

down([N]) ->
    {ok, R} = py:call('__main__', up, [N - 1]),
    R.

%% A request made in a callback runs on the Python thread that waits for that
%% callback. When its own caller times out, it is cancelled there, as any request
%% is: the loop stops, the callback returns, and the outer call finishes long
%% before its own timeout.
nested_request_cancelled_at_its_own_timeout(_Config) ->
    ok = py:register_function(nested_spin,
                              fun([]) ->
                                      case py:exec(<<"while True: pass">>, #{}, 300) of
                                          {error, timeout} -> <<"nested timed out">>;
                                          Other -> Other
                                      end
                              end),
    ok = py:exec(<<"import erlang">>),
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual({ok, <<"nested timed out">>},
                 py:eval(<<"erlang.call('nested_spin')">>, #{}, ?LIVENESS_MS)),
    ct:log("outer call took ~b ms", [erlang:monotonic_time(millisecond) - T0]),
    %% The thread is free again: its next request runs.
    ?assertEqual({ok, 2.0}, py:call(math, sqrt, [4.0], #{}, ?LIVENESS_MS)),
    ok = py:unregister_function(nested_spin).

%% The other way round: the outer call times out while a request nested in its
%% callback runs. The cancellation ends the nested request, and still ends the
%% outer one after it: the Python code after `erlang.call' never runs.
outer_cancel_not_taken_back_by_nested_request(_Config) ->
    ok = py:register_function(nested_spin_long,
                              fun([]) -> py:exec(<<"while True: pass">>, #{}, 3 * ?LIVENESS_MS) end),
    ok = py:exec(<<"import erlang\nreached = False">>),
    ?assertEqual({error, timeout},
                 py:exec(<<"erlang.call('nested_spin_long')\nreached = True">>, #{}, 500)),
    ?assertEqual({ok, 2.0}, py:call(math, sqrt, [4.0], #{}, ?LIVENESS_MS)),
    ?assertEqual({ok, false}, py:eval(<<"reached">>, #{}, ?LIVENESS_MS)),
    %% Ended, not written off: the thread was freed by the cancellation.
    ?assertEqual(0, stat(abandoned_workers)),
    ok = py:unregister_function(nested_spin_long).

%% A nested request whose caller gives up before it starts never starts. Here the
%% thread that waits for the callback has taken the request but cannot run it: a
%% request of another process holds the GIL in C (`sum' over a range) on a spare
%% worker. The nested caller times out meanwhile; when the GIL is free, the
%% request is answered `cancelled' instead of running its endless loop.
nested_request_cancelled_before_it_starts(_Config) ->
    Self = self(),
    ok = py:register_function(
           nested_behind_gil,
           fun([]) ->
                   spawn(fun() ->
                                 Self ! {hog, py:eval(<<"sum(range(2 * 10**8))">>, #{},
                                                      3 * ?LIVENESS_MS)}
                         end),
                   pyport_ct_lib:wait_until(fun() -> stat(busy_workers) >= 2 end, ?LIVENESS_MS,
                                            hog_running),
                   case py:exec(<<"while True: pass">>, #{}, 200) of
                       {error, timeout} -> <<"nested timed out">>;
                       Other -> Other
                   end
           end),
    ok = py:exec(<<"import erlang">>),
    ?assertEqual({ok, <<"nested timed out">>},
                 py:eval(<<"erlang.call('nested_behind_gil')">>, #{}, 3 * ?LIVENESS_MS)),
    receive {hog, Hog} -> ?assertMatch({ok, _}, Hog) after 3 * ?LIVENESS_MS -> ct:fail(no_hog) end,
    ?assertEqual(0, stat(abandoned_workers)),
    ok = py:unregister_function(nested_behind_gil).

%% A thread stuck in C with both its request and one nested in it cancelled is one
%% written-off worker, not two: the nested `time.sleep' ignores its cancellation
%% past abandon_after_ms (2 s), then so does the outer call's. When the sleep
%% ends, both end and nothing stays written off.
stuck_thread_written_off_once(_Config) ->
    ok = py:register_function(nested_sleep,
                              fun([]) -> py:exec(<<"import time; time.sleep(7)">>, #{}, 300) end),
    ok = py:exec(<<"import erlang">>),
    ?assertEqual({error, timeout}, py:eval(<<"erlang.call('nested_sleep')">>, #{}, 600)),
    %% Watched from the write-off until the sleep ends: never more than one.
    wait_until(fun() -> stat(abandoned_workers) > 0 end, ?LIVENESS_MS, written_off),
    Seen = watch_abandoned(now_ms() + 3 * ?LIVENESS_MS, #{}),
    ?assertEqual([0, 1], lists:sort(maps:keys(Seen))),
    ?assertEqual({ok, 2.0}, py:call(math, sqrt, [4.0], #{}, ?LIVENESS_MS)),
    ok = py:unregister_function(nested_sleep).

%% Python code that forks in a request nested in a callback: the child returns from
%% that request into the port's code, and must end there as a child of any request
%% does, not carry on as a second port; the parent's wait for it returns.
fork_in_nested_request(_Config) ->
    Fork = <<"import os\n"
             "pid = os.fork()\n"
             "if pid:\n"
             "    _, status = os.waitpid(pid, 0)\n"
             "    result = os.waitstatus_to_exitcode(status)\n">>,
    ok = py:register_function(nested_fork,
                              fun([]) ->
                                      ok = py:exec(Fork, #{}, ?LIVENESS_MS),
                                      {ok, Code} = py:eval(<<"result">>, #{}, ?LIVENESS_MS),
                                      Code
                              end),
    ok = py:exec(<<"import erlang">>),
    ?assertEqual({ok, 0}, py:eval(<<"erlang.call('nested_fork')">>, #{}, 3 * ?LIVENESS_MS)),
    ?assertEqual({ok, 2.0}, py:call(math, sqrt, [4.0], #{}, ?LIVENESS_MS)),
    ok = py:unregister_function(nested_fork).

%% The abandoned_workers values seen until it is back to 0.
watch_abandoned(Deadline, Seen) ->
    N = stat(abandoned_workers),
    case N =:= 0 orelse now_ms() > Deadline of
        true -> Seen#{N => true};
        false -> timer:sleep(20), watch_abandoned(Deadline, Seen#{N => true})
    end.

%% The same from 8 Erlang processes at once: each gets 10 (from its own namespace's
%% up), and the port's `workers' is 1 in every stats sample taken meanwhile.
ten_levels_from_eight_callers(_Config) ->
    ok = py:register_function(down, fun down/1),
    Self = self(),
    Sampler = spawn_link(fun() -> sample_workers(#{}) end),
    Pids = [spawn_link(fun() ->
                               ok = py:exec(?UP_PY),
                               Self ! {up, self(), py:call('__main__', up, [10], #{}, 3 * ?LIVENESS_MS)}
                       end) || _ <- lists:seq(1, 8)],
    Results = pyport_ct_lib:collect(up, Pids),
    Sampler ! {stop, self()},
    Seen = receive {workers_seen, S} -> S after ?LIVENESS_MS -> ct:fail(no_samples) end,
    ?assertEqual(lists:duplicate(8, {ok, 10}), Results),
    ?assertEqual([1], maps:keys(Seen)),
    ok = py:unregister_function(down).

%% Polls py:stats() (answered by the port's reader, not by a worker) until told to stop.
sample_workers(Seen) ->
    Seen1 = Seen#{stat(workers) => true},
    receive
        {stop, From} -> From ! {workers_seen, Seen1}
    after 5 ->
            sample_workers(Seen1)
    end.

%% A thread started during a call (threading.Thread + join) calls Erlang.
callback_from_thread_started_in_call(_Config) ->
    setup_ns(),
    ok = py:register_function(cb_double, fun([X]) -> 2 * X end),
    {ok, {<<"ok">>, 42}} = py:eval(<<"pyport_cb_ct.in_thread(erlang.call, 'cb_double', 21)">>),
    ok = py:unregister_function(cb_double).

%%--------------------------------------------------------------------
%% erlang.send, erlang.self, erlang.whereis

%% erlang.send(erlang.self(), Term) delivers the converted term to the caller.
send_to_self_converts(_Config) ->
    setup_ns(),
    ok = py:exec(<<"erlang.send(erlang.self(), (1, 'two', [3.5], {'k': b'v'}, 2**70, None))">>),
    Msg = receive M -> M after ?LIVENESS_MS -> ct:fail(no_message) end,
    ?assertEqual({1, <<"two">>, [3.5], #{<<"k">> => <<"v">>}, 1 bsl 70, undefined}, Msg),
    pyport_ct_lib:assert_mailbox_empty().

%% 1,000 messages sent by one Python thread arrive in the order sent.
thousand_messages_in_order(_Config) ->
    setup_ns(),
    {ok, 1000} = py:eval(<<"pyport_cb_ct.send_many(p, 1000)">>, #{p => self()}),
    ok = receive_seq(0, 1000),
    pyport_ct_lib:assert_mailbox_empty().

receive_seq(N, N) ->
    ok;
receive_seq(I, N) ->
    receive
        {<<"seq">>, J} -> ?assertEqual(I, J), receive_seq(I + 1, N)
    after ?LIVENESS_MS ->
            ct:fail({missing_message, I})
    end.

%% Sending to a dead local process is no error (like `!'); the port goes on serving.
send_to_dead_pid_is_no_error(_Config) ->
    setup_ns(),
    {Dead, Ref} = spawn_monitor(fun() -> ok end),
    receive {'DOWN', Ref, process, Dead, _} -> ok end,
    {ok, {<<"ok">>, undefined}} =
        py:eval(<<"pyport_cb_ct.outcome(erlang.send, p, 'x')">>, #{p => Dead}),
    {ok, 42} = py:call(operator, mul, [6, 7]).

%% erlang.self() is the caller, in the call and in a thread started during it; a
%% thread whose caller was cleared gets NoCaller.
self_in_call_and_inherited_by_threads(_Config) ->
    setup_ns(),
    Me = self(),
    {ok, Me} = py:eval(<<"erlang.self()">>),
    {ok, {<<"ok">>, Me}} = py:eval(<<"pyport_cb_ct.in_thread(erlang.self)">>),
    {ok, {<<"ok">>, {<<"NoCaller">>, _}}} =
        py:eval(<<"pyport_cb_ct.in_thread(pyport_cb_ct.orphan_outcome, erlang.self)">>),
    %% and a caller's callback runs for that caller: a nested self() inside the
    %% callback's py:eval is still the caller
    ok = py:register_function(cb_nested_self, fun([]) -> {ok, P} = py:eval(<<"erlang.self()">>), P end),
    {ok, Me} = py:eval(<<"erlang.call('cb_nested_self')">>),
    ok = py:unregister_function(cb_nested_self).

%% whereis finds registered names, gives None for others, and never makes an atom of
%% the name it was asked about.
whereis_never_creates_atoms(_Config) ->
    setup_ns(),
    Server = whereis(pyport_server),
    {ok, Server} = py:eval(<<"erlang.whereis('pyport_server')">>),
    {ok, undefined} = py:eval(<<"erlang.whereis(n)">>, #{n => fresh_name()}),   % warm-up
    Name = fresh_name(),
    Before = erlang:system_info(atom_count),
    {ok, undefined} = py:eval(<<"erlang.whereis(n)">>, #{n => Name}),
    After = erlang:system_info(atom_count),
    ?assertEqual(Before, After),
    ?assertError(badarg, binary_to_existing_atom(Name, utf8)).

fresh_name() ->
    iolist_to_binary(["pyport_ct_never_", integer_to_list(erlang:unique_integer([positive])),
                      "_", integer_to_list(erlang:system_time())]).

%%--------------------------------------------------------------------
%% Timeouts

%% Registers `slow', which hands its pid to a watcher (monitored before it goes on) and
%% sleeps ?SLOW_MS. Returns the watcher; it sends {slow_down, Pid, Reason}.
register_slow() ->
    Self = self(),
    Watcher = spawn_link(fun() ->
                                 receive {watch, P} ->
                                         MRef = erlang:monitor(process, P),
                                         P ! watching,
                                         receive {'DOWN', MRef, process, P, R} -> Self ! {slow_down, P, R} end
                                 end
                         end),
    ok = py:register_function(slow, fun(_) ->
                                            Watcher ! {watch, self()},
                                            receive watching -> ok end,
                                            timer:sleep(?SLOW_MS),
                                            done
                                    end),
    Watcher.

slow_down() ->
    receive {slow_down, P, R} -> {P, R}
    after ?LIVENESS_MS -> ct:fail(slow_callback_not_ended)
    end.

%% The outer call's timeout ends the callback wait: the caller gets {error, timeout},
%% Python gets erlang.CallCancelled, the callback process is killed, and the one worker
%% serves the next call at once (well before the callback's sleep would end).
slow_callback_killed_at_caller_timeout(_Config) ->
    _ = register_slow(),
    T0 = now_ms(),
    {error, timeout} = py:call(pyport_cb_ct, call_slow, [<<"cancelled">>], #{}, 300),
    {_, killed} = slow_down(),
    {ok, 42} = py:call(operator, mul, [6, 7], #{}, ?LIVENESS_MS),
    Elapsed = now_ms() - T0,
    ?assert(Elapsed < ?SLOW_MS div 2),
    {ok, <<"CallCancelled">>} = py:call(pyport_cb_ct, get, [<<"cancelled">>]),
    %% One CallCancelled, not two: the handler ran to its end.
    {ok, true} = py:call(pyport_cb_ct, get, [<<"cancelled_handler_done">>]),
    ok = py:unregister_function(slow).

%% A thread outside any call waits callback_timeout (300 ms here) for its callback: it
%% gets TimeoutError, and the callback process is killed.
callback_timeout_outside_any_call(_Config) ->
    _ = register_slow(),
    {ok, true} = py:call(pyport_cb_ct, orphan_calls_slow, [<<"orphan">>]),
    {_, killed} = slow_down(),
    Waited = wait_until(fun() ->
                                case py:call(pyport_cb_ct, get, [<<"orphan">>]) of
                                    {ok, {<<"TimeoutError">>, S}} -> {true, S};
                                    Other -> Other
                                end
                        end, ?LIVENESS_MS, orphan_timeout_error),
    ?assert(Waited >= 0.29),
    ?assert(Waited < 5.0),
    ok = py:unregister_function(slow).

%% The server forgets every callback process once it ended, also those that made
%% requests of their own (which the server watches a second time, as requesters).
callback_processes_are_forgotten(_Config) ->
    ok = py:register_function(nested_sqrt, fun([X]) -> {ok, R} = py:call(math, sqrt, [X]), R end),
    ok = py:exec(<<"import erlang">>),
    [{ok, 2.0} = py:eval(<<"erlang.nested_sqrt(4.0)">>) || _ <- lists:seq(1, 20)],
    wait_until(fun() -> maps:get(callbacks, pyport_ct_lib:stats()) =:= 0 end, ?LIVENESS_MS,
               callbacks_left),
    ok = py:unregister_function(nested_sqrt).

%% A frame Python would send over max_reply_bytes (100 kB here) is refused where it
%% is made, instead of being dropped on the way out: erlang.call and erlang.send
%% raise ValueError, a stream ends with {error, {reply_too_large, Size, Max}}.
frames_over_max_reply_bytes_are_errors(_Config) ->
    ok = py:register_function(echo_big, fun([X]) -> X end),
    ok = py:exec(<<"import erlang\nbig = b'x' * 200000\n">>),
    {ok, [<<"ValueError">> | _]} = py:eval(<<"list(__import__('pyport_cb_ct').outcome(erlang.call, 'echo_big', big))">>),
    {ok, [<<"ValueError">> | _]} = py:eval(<<"list(__import__('pyport_cb_ct').outcome(erlang.send, erlang.self(), big))">>),
    ok = py:exec(<<"def items():\n    yield 1\n    yield b'y' * 200000\n    yield 3\n">>),
    {ok, Ref} = py:stream_start('__main__', items, []),
    receive {py_stream, Ref, {data, 1}} -> ok = py:stream_ack(Ref) after ?LIVENESS_MS -> ct:fail(no_item) end,
    receive
        {py_stream, Ref, {error, {reply_too_large, Size, 100000}}} -> ?assert(Size > 100000)
    after ?LIVENESS_MS -> ct:fail(no_stream_error)
    end,
    ok = py:unregister_function(echo_big).
