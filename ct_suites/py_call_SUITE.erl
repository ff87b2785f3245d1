%% py:call/eval/exec: arguments, per-process namespaces and their
%% cleanup, exception shape, timeouts with interruption, stdout safety and
%% configuration by application env.
-module(py_call_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(pyport_ct_lib, [stat/1, now_ms/0, wait_until/2, wait_until/3, wait_down/1,
                        assert_mailbox_empty/0, wait_waiting/1, has/2]).

%% Shared Python state for the interruption tests: a module in sys.modules is
%% visible to every process namespace, so a test can watch what a (timed out
%% or orphaned) call is doing. spin/2 busy-loops for Secs seconds, catching
%% `Exception` (which the interruption must not be), then sets `finished`.
-define(STATE_PY, <<"
import sys, time, types
_st = sys.modules.get('pyport_ct_state')
if _st is None:
    _st = types.ModuleType('pyport_ct_state')
    sys.modules['pyport_ct_state'] = _st

def reset(name):
    setattr(_st, name, {'started': False, 'finished': False, 'swallowed': 0})
    return True

def state(name):
    return getattr(_st, name)

def spin(name, secs):
    s = getattr(_st, name)
    s['started'] = True
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            while time.monotonic() < end:
                pass
        except Exception:
            s['swallowed'] += 1
    s['finished'] = True
    return 'finished'
">>).

suite() ->
    [{timetrap, {seconds, 60}}].

all() ->
    [call_module_function_names,
     call_kwargs_and_timeout,
     call_errors,
     eval_basic,
     exec_basic,
     locals_are_bound_in_namespace,
     badarg_at_call_site,
     namespaces_are_per_process,
     namespace_freed_on_exit,
     exception_shape,
     base_exceptions_are_errors,
     concurrent_callers,
     stdout_does_not_corrupt_protocol,
     stats_shape,
     timeout_interrupts_python,
     timeout_busy_loop_is_cancelled,
     no_late_reply_after_timeout,
     caller_death_cancels_work,
     exec_and_call_timeouts,
     sleeping_call_does_not_stall_others,
     config_from_app_env].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

init_per_testcase(namespace_freed_on_exit, Config) ->
    %% exact namespace counts: start from a fresh port, unaffected by the
    %% namespaces of earlier test-case processes still being freed
    ok = pyport_ct_lib:restart_app(),
    Config;
init_per_testcase(config_from_app_env, Config) ->
    Keys = [workers, max_workers, call_timeout, sys_path, startup_code],
    Saved = pyport_ct_lib:save_env(Keys),
    [{saved_env, Saved} | Config];
init_per_testcase(_, Config) ->
    Config.

end_per_testcase(config_from_app_env, Config) ->
    pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config));
end_per_testcase(_, _Config) ->
    ok.

%%--------------------------------------------------------------------
%% call

call_module_function_names(_Config) ->
    {ok, 4.0} = py:call(math, sqrt, [16]),
    {ok, 3.0} = py:call(<<"math">>, <<"sqrt">>, [9.0]),
    {ok, 3.0} = py:call(math, <<"sqrt">>, [9]),
    {ok, 3.0} = py:call(<<"math">>, sqrt, [9]),
    {ok, 5} = py:call(builtins, len, [[1, 2, 3, 4, 5]]),
    %% a dotted function path inside the module
    {ok, <<"a/b">>} = py:call(os, 'path.join', [<<"a">>, <<"b">>]),
    %% a module inside a package
    {ok, <<"{\"a\": [1, 2]}">>} = py:call('json', dumps, [#{a => [1, 2]}]),
    {ok, <<"ABC">>} = py:call(<<"builtins">>, 'str.upper', [<<"abc">>]),
    ok.

call_kwargs_and_timeout(_Config) ->
    {ok, [3, 2, 1]} = py:call(builtins, sorted, [[2, 3, 1]], #{reverse => true}),
    {ok, [3, 2, 1]} = py:call(builtins, sorted, [[2, 3, 1]], #{<<"reverse">> => true}),
    {ok, [1, 2, 3]} = py:call(builtins, sorted, [[2, 3, 1]], #{}),
    ?assertEqual({ok, #{<<"a">> => 1, <<"b">> => [2]}}, py:call(builtins, dict, [], #{a => 1, b => [2]})),
    {ok, 2.0} = py:call(math, sqrt, [4], #{}, 10000),
    {ok, 2.0} = py:call(math, sqrt, [4], #{}, infinity),
    ok.

call_errors(_Config) ->
    {error, {python, 'ModuleNotFoundError', Msg, _}} = py:call(no_such_module_xyz, f, []),
    true = has(Msg, <<"no_such_module_xyz">>),
    %% README: a missing attribute is Python's AttributeError...
    {error, {python, 'AttributeError', AttrMsg, _}} = py:call(math, no_such_function, []),
    true = has(AttrMsg, <<"no_such_function">>),
    {error, {python, 'AttributeError', _, _}} = py:call(os, 'path.no_such_function', []),
    %% ...and naming something that is not callable is {not_callable, Repr}
    {error, {not_callable, <<"3.141592653589793">>}} = py:call(math, pi, []),
    ok = py:exec(<<"not_a_function = [1, 'two']">>),
    {error, {not_callable, <<"[1, 'two']">>}} = py:call('__main__', not_a_function, []),
    {error, {python, 'TypeError', _, _}} = py:call(math, sqrt, [1, 2]),
    {error, {python, 'TypeError', _, _}} = py:call(math, sqrt, [<<"x">>]),
    {error, {python, 'TypeError', _, _}} = py:call(math, sqrt, [4], #{nope => 1}),
    %% the port still serves
    {ok, 2.0} = py:call(math, sqrt, [4]),
    ok.

%%--------------------------------------------------------------------
%% eval / exec

eval_basic(_Config) ->
    {ok, 3} = py:eval(<<"1 + 2">>),
    {ok, 3} = py:eval("1 + 2"),
    {ok, <<"é"/utf8>>} = py:eval("'é'"),
    {ok, <<"日本"/utf8>>} = py:eval(<<"'日本'"/utf8>>),
    {ok, 42} = py:eval(<<"x * y">>, #{x => 6, <<"y">> => 7}),
    {ok, 42} = py:eval(<<"x * y">>, #{x => 6, y => 7}, 10000),
    {ok, 42} = py:eval(<<"x * y">>, #{x => 6, y => 7}, infinity),
    {ok, 4} = py:eval(<<"_x + 1">>, #{'_x' => 3}),
    %% non-ASCII identifiers are Python identifiers too
    {ok, 4} = py:eval(<<"π * 2"/utf8>>, #{<<"π"/utf8>> => 2}),
    {ok, [0, 1, 4]} = py:eval(<<"[i * i for i in range(3)]">>),
    {error, {python, 'SyntaxError', _, _}} = py:eval(<<"x = 1">>),
    {error, {python, 'SyntaxError', _, _}} = py:eval(<<"1 +">>),
    {error, {python, 'NameError', NameMsg, _}} = py:eval(<<"undefined_name_xyz">>),
    true = has(NameMsg, <<"undefined_name_xyz">>),
    ok.

exec_basic(_Config) ->
    ok = py:exec(<<"a = 40">>),
    ok = py:exec("b = 2"),
    {ok, 42} = py:eval(<<"a + b">>),
    ok = py:exec(<<"def add(x, y=1):\n    return x + y\n">>),
    {ok, 3} = py:call('__main__', add, [2]),
    {ok, 12} = py:call(<<"__main__">>, <<"add">>, [2], #{y => 10}),
    {ok, 7} = py:eval(<<"add(3, 4)">>),
    ok = py:exec(<<"import math\nr = math.floor(2.5)">>, #{}, 10000),
    {ok, 2} = py:eval(<<"r">>),
    ok = py:exec(<<"class Counter:\n    n = 0\n    def bump(self):\n        Counter.n += 1\n        return Counter.n\nc = Counter()\n">>),
    {ok, 1} = py:eval(<<"c.bump()">>),
    {ok, 2} = py:eval(<<"c.bump()">>),
    {error, {python, 'SyntaxError', _, _}} = py:exec(<<"def (">>),
    {error, {python, 'ValueError', <<"bad">>, _}} = py:exec(<<"raise ValueError('bad')">>),
    %% a failing exec keeps what it assigned before the exception
    {error, {python, 'ZeroDivisionError', _, _}} = py:exec(<<"partial = 1\n1/0\n">>),
    {ok, 1} = py:eval(<<"partial">>),
    ok.

%% Locals are assigned in the caller's namespace, and stay there.
locals_are_bound_in_namespace(_Config) ->
    ok = py:exec(<<"total = base + extra">>, #{base => 40, <<"extra">> => 2}),
    {ok, 42} = py:eval(<<"total">>),
    {ok, 40} = py:eval(<<"base">>),
    {ok, 2} = py:eval(<<"extra">>),
    %% a local overrides an earlier binding, as an assignment would
    {ok, 7} = py:eval(<<"base">>, #{base => 7}),
    {ok, 7} = py:eval(<<"base">>),
    %% functions defined by exec see later rebinding of their globals
    ok = py:exec(<<"def get_base():\n    return base\n">>),
    {ok, 9} = py:eval(<<"get_base()">>, #{base => 9}),
    {ok, 9} = py:call('__main__', get_base, []),
    ok.

badarg_at_call_site(_Config) ->
    %% code that is not a binary or a string
    ?assertError(badarg, py:eval(42)),
    ?assertError(badarg, py:eval(not_code)),
    ?assertError(badarg, py:eval({<<"1">>})),
    ?assertError(badarg, py:exec(42)),
    ?assertError(badarg, py:exec(#{})),
    ?assertError(badarg, py:eval(42, #{})),
    ?assertError(badarg, py:exec(42, #{}, 1000)),
    %% Args that is not a list
    ?assertError(badarg, py:call(math, sqrt, 16)),
    ?assertError(badarg, py:call(math, sqrt, {16})),
    ?assertError(badarg, py:call(math, sqrt, 16, #{})),
    ?assertError(badarg, py:call(math, sqrt, <<"16">>, #{}, 1000)),
    %% Locals keys that are not Python identifiers
    ?assertError(badarg, py:eval(<<"1">>, #{<<"1x">> => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{<<"a b">> => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{<<"a-b">> => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{<<>> => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{'' => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{1 => 2})),
    ?assertError(badarg, py:eval(<<"1">>, #{"x" => 2})),
    %% dunder names
    ?assertError(badarg, py:eval(<<"1">>, #{'__x__' => 1})),
    ?assertError(badarg, py:exec(<<"pass">>, #{<<"__builtins__">> => 1})),
    ?assertError(badarg, py:exec(<<"pass">>, #{<<"__name__">> => 1})),
    %% keywords
    ?assertError(badarg, py:eval(<<"1">>, #{class => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{<<"None">> => 1})),
    ?assertError(badarg, py:eval(<<"1">>, #{'True' => 1})),
    ?assertError(badarg, py:exec(<<"pass">>, #{lambda => 1})),
    ?assertError(badarg, py:exec(<<"pass">>, #{<<"def">> => 1})),
    %% two keys naming the same variable
    ?assertError(badarg, py:eval(<<"1">>, #{a => 1, <<"a">> => 2})),
    ?assertError(badarg, py:exec(<<"pass">>, #{a => 1, <<"a">> => 2})),
    %% Locals that is not a map
    ?assertError(badarg, py:eval(<<"1">>, [{a, 1}])),
    ?assertError(badarg, py:exec(<<"pass">>, [{a, 1}])),
    %% nothing was bound by the rejected calls
    {error, {python, 'NameError', _, _}} = py:eval(<<"a">>),
    ok.

%%--------------------------------------------------------------------
%% namespaces

namespaces_are_per_process(_Config) ->
    ok = py:exec(<<"secret = 1\ndef who():\n    return secret\n">>),
    {Pid, Ref} =
        spawn_monitor(fun() ->
                              R1 = py:eval(<<"secret">>),
                              R2 = py:call('__main__', who, []),
                              ok = py:exec(<<"secret = 2">>),
                              R3 = py:eval(<<"secret">>),
                              exit({results, R1, R2, R3})
                      end),
    receive
        {'DOWN', Ref, process, Pid, {results, R1, R2, R3}} ->
            {error, {python, 'NameError', _, _}} = R1,
            %% the function is not in the other process's namespace
            {error, {python, 'NameError', _, _}} = R2,
            {ok, 2} = R3;
        {'DOWN', Ref, process, Pid, Other} ->
            ct:fail({helper_crashed, Other})
    after 10000 ->
            ct:fail(helper_timeout)
    end,
    %% the other process's assignment did not touch ours
    {ok, 1} = py:eval(<<"secret">>),
    {ok, 1} = py:call('__main__', who, []),
    ok.

namespace_freed_on_exit(_Config) ->
    Base = stat(namespaces),
    Self = self(),
    N = 10,
    Holders = [spawn(fun() ->
                             ok = py:exec(<<"v = i * 2">>, #{i => I}),
                             {ok, V} = py:eval(<<"v">>),
                             Self ! {ready, self(), V},
                             receive stop -> ok end
                     end) || I <- lists:seq(1, N)],
    Vs = pyport_ct_lib:collect(ready, Holders),
    ?assertEqual([I * 2 || I <- lists:seq(1, N)], Vs),
    %% each holder owns one namespace in the port
    wait_until(fun() -> stat(namespaces) =:= Base + N end, 10000, namespaces_created),
    {Normal, Killed} = lists:split(N div 2, Holders),
    [P ! stop || P <- Normal],
    [exit(P, kill) || P <- Killed],
    [_ = wait_down(P) || P <- Holders],
    %% normal exit and kill both free the namespace in the port
    wait_until(fun() -> case stat(namespaces) of Base -> true; C -> {namespaces, C, base, Base} end end,
               10000, namespaces_freed),
    %% a new process starts with an empty namespace
    {error, {python, 'NameError', _, _}} =
        pyport_ct_lib:run_in_process(fun() -> py:eval(<<"v">>) end),
    ok.

%%--------------------------------------------------------------------
%% exceptions

exception_shape(_Config) ->
    {error, {python, 'ZeroDivisionError', <<"division by zero">>, TB}} = py:eval(<<"1/0">>),
    true = is_binary(TB),
    true = has(TB, <<"Traceback">>),
    true = has(TB, <<"ZeroDivisionError: division by zero">>),
    ok = py:exec(<<"class AppError(Exception):\n    pass\n\ndef fail_here(msg):\n    raise AppError(msg)\n">>),
    %% A class that is not built in is named by a binary of its qualified name
    %% (class names are chosen by Python code; they never become atoms).
    {error, {python, <<"__main__.AppError">>, <<"héllo wörld"/utf8>>, TB2}} =
        py:call('__main__', fail_here, [<<"héllo wörld"/utf8>>]),
    true = has(TB2, <<"fail_here">>),
    true = has(TB2, <<"AppError">>),
    {error, {python, <<"json.decoder.JSONDecodeError">>, _, TB3}} = py:call(json, loads, [<<"{bad">>]),
    true = has(TB3, <<"json.decoder.JSONDecodeError">>),
    {error, {python, 'KeyError', <<"'k'">>, _}} = py:eval(<<"{}['k']">>),
    {error, {python, 'RuntimeError', <<>>, _}} = py:exec(<<"raise RuntimeError()">>),
    %% chained exceptions keep the outer one
    {error, {python, 'ValueError', <<"outer">>, TB4}} =
        py:exec(<<"try:\n    1/0\nexcept ZeroDivisionError as e:\n    raise ValueError('outer') from e\n">>),
    true = has(TB4, <<"ZeroDivisionError">>),
    ok.

%% BaseExceptions raised by user code are reported, and the port keeps serving.
base_exceptions_are_errors(_Config) ->
    {error, {python, 'SystemExit', <<"3">>, _}} = py:exec(<<"import sys; sys.exit(3)">>),
    {ok, 2} = py:eval(<<"1 + 1">>),
    {error, {python, 'KeyboardInterrupt', _, _}} = py:exec(<<"raise KeyboardInterrupt">>),
    {ok, 2} = py:eval(<<"1 + 1">>),
    {error, {python, 'GeneratorExit', _, _}} = py:exec(<<"raise GeneratorExit">>),
    {ok, 2} = py:eval(<<"1 + 1">>),
    ok.

%%--------------------------------------------------------------------
%% concurrency, stdout, stats

concurrent_callers(_Config) ->
    Self = self(),
    N = 50,
    Pids = [spawn_link(fun() ->
                               R1 = py:eval(<<"x * 3">>, #{x => I}),
                               R2 = py:call(builtins, abs, [-I]),
                               Self ! {res, self(), {R1, R2}}
                       end) || I <- lists:seq(1, N)],
    Results = pyport_ct_lib:collect(res, Pids),
    Expected = [{{ok, I * 3}, {ok, I}} || I <- lists:seq(1, N)],
    Expected = Results,
    %% replies come out of order: a fast call is not held up by a slow one
    Slow = spawn_link(fun() ->
                              Self ! {res, self(), py:eval(<<"__import__('time').sleep(5) or 'slow'">>)}
                      end),
    wait_until(fun() -> stat(busy_workers) >= 1 end, 10000, slow_call_running),
    T0 = now_ms(),
    {ok, <<"fast">>} = py:eval(<<"'fast'">>),
    FastMs = now_ms() - T0,
    ct:log("fast call answered in ~b ms while a slow call ran", [FastMs]),
    %% (no time bound: the ordering check below is the promise)
    receive {res, Slow, Early} -> ct:fail({slow_call_answered_before_fast_one, Early})
    after 0 -> ok
    end,
    [{ok, <<"slow">>}] = pyport_ct_lib:collect(res, [Slow]),
    ok.

stdout_does_not_corrupt_protocol(_Config) ->
    ok = py:exec(<<"
import os, sys
print('hello from python')
sys.stdout.write('x' * 200000)
sys.stdout.flush()
os.write(1, b'raw write on fd 1\\n' * 1000)
print('to stderr', file=sys.stderr)
os.write(2, b'raw write on fd 2\\n')
">>),
    {ok, 2} = py:eval(<<"1 + 1">>),
    {ok, <<"abc">>} = py:call(builtins, str, [<<"abc">>]),
    ok.

stats_shape(_Config) ->
    {ok, M} = py:stats(),
    true = is_map(M),
    [true = is_integer(maps:get(K, M)) andalso maps:get(K, M) >= 0
     || K <- [dicts, dict_keys, namespaces, workers]],
    true = maps:get(workers, M) >= 1,
    %% the calling process's namespace is counted
    ok = py:exec(<<"here = 1">>),
    true = stat(namespaces) >= 1,
    ok.

%%--------------------------------------------------------------------
%% timeouts and cancellation

%% The timed-out call's Python code is interrupted: the loop would set
%% `finished` after 3 s but never does, and the interruption is not an
%% `Exception` (the loop's `except Exception` never sees it).
timeout_interrupts_python(_Config) ->
    ok = py:exec(?STATE_PY),
    {ok, true} = py:call('__main__', reset, [<<"t1">>]),
    T0 = now_ms(),
    {error, timeout} = py:call('__main__', spin, [<<"t1">>, 3.0], #{}, 1000),
    Elapsed = now_ms() - T0,
    ct:log("timeout returned after ~b ms", [Elapsed]),
    true = Elapsed < 10000,
    %% The loop has stopped once its worker is idle: interrupted, or (were it
    %% not interrupted) after its 3 s, having set `finished'.
    wait_until(fun() -> stat(busy_workers) =:= 0 end, 10000, spin_stopped),
    {ok, #{<<"started">> := true, <<"finished">> := false, <<"swallowed">> := 0}} =
        py:call('__main__', state, [<<"t1">>]),
    assert_mailbox_empty(),
    ok.

%% `while True: pass` is cancelled: the worker comes back, the next call is fast.
timeout_busy_loop_is_cancelled(_Config) ->
    T0 = now_ms(),
    {error, timeout} = py:exec(<<"while True:\n    pass\n">>, #{}, 300),
    true = now_ms() - T0 < 10000,
    T1 = now_ms(),
    {ok, 2} = py:eval(<<"1 + 1">>),
    true = now_ms() - T1 < 10000,
    %% an infinite generator in eval, too
    {error, timeout} = py:eval(<<"all(True for _ in iter(int, 1))">>, #{}, 300),
    %% the looping workers were freed (were they not, they would stay busy forever)
    wait_until(fun() -> case stat(busy_workers) of 0 -> true; B -> {busy_workers, B} end end,
               10000, workers_freed),
    {ok, 2} = py:eval(<<"1 + 1">>),
    assert_mailbox_empty(),
    ok.

%% A call stuck in C (time.sleep) cannot be interrupted; its reply, produced
%% after the caller gave up, must never reach the caller's mailbox.
no_late_reply_after_timeout(_Config) ->
    T0 = now_ms(),
    {error, timeout} = py:call(time, sleep, [1.5], #{}, 200),
    true = now_ms() - T0 < 10000,
    {error, timeout} = py:eval(<<"__import__('time').sleep(1.5)">>, #{}, 200),
    %% the sleeps have certainly ended (and replied) once the workers are idle
    wait_until(fun() -> stat(busy_workers) =:= 0 end, 10000, sleeps_finished),
    {ok, 2} = py:eval(<<"1 + 1">>),
    assert_mailbox_empty(),
    ok.

%% A caller that dies mid-call cancels its work. The loop's state is read by
%% module calls from processes without a namespace: they float to any free
%% worker. (Read from this process, they could queue behind the loop itself:
%% with a namespace this process would have a home thread, and the dying
%% caller is homed on an idle worker, possibly the same one.)
caller_death_cancels_work(_Config) ->
    {ok, true} = pyport_ct_lib:run_in_process(
                   fun() -> ok = py:exec(?STATE_PY), py:call('__main__', reset, [<<"t2">>]) end),
    Pid = spawn(fun() ->
                        ok = py:exec(?STATE_PY),
                        _ = py:call('__main__', spin, [<<"t2">>, 3.0], #{}, infinity)
                end),
    wait_until(fun() -> spin_state(<<"t2">>, <<"started">>) end, 10000, spin_started),
    exit(Pid, kill),
    %% The worker is freed (the loop stopped: interrupted, or, were it not,
    %% after its 3 s, having set `finished')...
    wait_until(fun() -> stat(busy_workers) =:= 0 end, 10000, worker_freed),
    %% ...and the loop never reached its end.
    ?assertEqual(false, spin_state(<<"t2">>, <<"finished">>)),
    ok.

%% A field of the state of STATE_PY's loop `Name', read by a module call.
spin_state(Name, Key) ->
    {ok, V} = pyport_ct_lib:run_in_process(
                fun() -> py:call(pyport_ct_state, <<Name/binary, ".get">>, [Key]) end),
    V.

exec_and_call_timeouts(_Config) ->
    T0 = now_ms(),
    {error, timeout} = py:exec(<<"while True:\n    pass\n">>, #{}, 200),
    {error, timeout} = py:call(time, sleep, [0.5], #{}, 100),
    {error, timeout} = py:call(time, sleep, [0.5], #{}, 0),
    true = now_ms() - T0 < 10000,
    {ok, 2} = py:eval(<<"1 + 1">>),
    ok.

%% One caller sleeping in Python never stalls the others (elastic pool).
sleeping_call_does_not_stall_others(_Config) ->
    Self = self(),
    Sleepers = [spawn(fun() ->
                              Self ! {slept, self(), py:eval(<<"__import__('time').sleep(12)">>, #{}, infinity)}
                      end) || _ <- [1, 2]],
    wait_waiting(Sleepers),
    wait_until(fun() -> stat(busy_workers) >= 2 end, 10000, sleepers_running),
    T0 = now_ms(),
    {ok, 2} = py:eval(<<"1 + 1">>),
    {ok, 3.0} = py:call(math, sqrt, [9]),
    Ms = now_ms() - T0,
    ct:log("calls answered in ~b ms while two workers sleep", [Ms]),
    true = Ms < 10000,
    [exit(P, kill) || P <- Sleepers],
    ok.

%%--------------------------------------------------------------------
%% configuration (application env, see erl_src/pyport.app.src)

config_from_app_env(Config) ->
    DataDir = ?config(data_dir, Config),
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, workers, 2),
    ok = application:set_env(pyport, max_workers, 3),
    ok = application:set_env(pyport, call_timeout, 500),
    ok = application:set_env(pyport, sys_path, [DataDir]),
    ok = application:set_env(pyport, startup_code,
                             "import __main__, cfg_module\n__main__.PYPORT_CT_STARTUP = cfg_module.VALUE\n"),
    _ = pyport_ct_lib:start_app(),
    %% worker count
    2 = stat(workers),
    %% extra sys.path entry: a module from the data dir is importable
    {ok, <<"from the data dir">>} = py:call(cfg_module, hello, []),
    %% start-up code ran in __main__
    {ok, 4242} = py:eval(<<"__import__('__main__').PYPORT_CT_STARTUP">>),
    %% default call timeout applies to call/eval...
    %% (a 1.2 s sleep times out: the default is 500 ms here, not 30 s)
    {error, timeout} = py:eval(<<"__import__('time').sleep(1.2)">>),
    {error, timeout} = py:call(time, sleep, [1.2]),
    %% ...but exec still defaults to infinity
    ok = py:exec(<<"import time; time.sleep(0.8)">>),
    %% the cap on workers: four sleepers, but never more than three workers
    wait_until(fun() -> stat(busy_workers) =:= 0 end, 10000, timed_out_sleeps_done),
    Self = self(),
    Sleepers = [spawn(fun() -> Self ! {slept, self(), py:exec(<<"import time; time.sleep(2)">>)} end)
                || _ <- [1, 2, 3, 4]],
    wait_until(fun() -> stat(busy_workers) =:= 3 end, 10000, pool_grew_to_cap),
    #{workers := W, busy_workers := 3} = pyport_ct_lib:stats(),
    true = W =< 3,
    [ok, ok, ok, ok] = pyport_ct_lib:collect(slept, Sleepers),
    true = stat(workers) =< 3,
    ok.
