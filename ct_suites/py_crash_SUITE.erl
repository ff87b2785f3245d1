%% Port crash and restart: every pending caller gets
%% {error, {pyport_exit, _}}, the VM and application survive, the next call
%% succeeds within ~10 s, namespaces start empty, old SharedDict handles are
%% destroyed, and start-up configuration is applied again.
-module(py_crash_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile([export_all, nowarn_export_all]).

-import(pyport_ct_lib, [stat/1, now_ms/0, wait_until/3, wait_waiting/1, collect/2]).

suite() ->
    [{timetrap, {seconds, 90}}].

all() ->
    [abort_then_recover,
     exit_status_reported,
     segfault_then_recover,
     sigkill_from_outside_with_pending_callers,
     namespaces_start_empty,
     dicts_survive_a_crash,
     repeated_crashes_recover,
     startup_config_reapplied].

init_per_suite(Config) ->
    _ = pyport_ct_lib:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct_lib:stop_app().

%% A fresh server per case, so a previous crash's restart back-off never
%% carries over into the next case.
init_per_testcase(startup_config_reapplied, Config) ->
    Saved = pyport_ct_lib:save_env([sys_path, startup_code]),
    ok = pyport_ct_lib:restart_app(),
    [{saved_env, Saved} | Config];
init_per_testcase(_, Config) ->
    ok = pyport_ct_lib:restart_app(),
    Config.

end_per_testcase(startup_config_reapplied, Config) ->
    pyport_ct_lib:restore_env_and_restart(?config(saved_env, Config));
end_per_testcase(_, _Config) ->
    ok.

%%--------------------------------------------------------------------

%% Polls a trivial call until it succeeds; returns how long that took.
wait_recovered(T0) ->
    wait_until(fun() -> py:eval(<<"1 + 1">>, #{}, 5000) =:= {ok, 2} end, 10000, port_recovered),
    Ms = now_ms() - T0,
    ct:log("port answered again ~b ms after the crash", [Ms]),
    Ms.

os_pid() ->
    {ok, P} = py:eval(<<"__import__('os').getpid()">>),
    P.

app_running() ->
    lists:keymember(pyport, 1, application:which_applications()).

%%--------------------------------------------------------------------

abort_then_recover(_Config) ->
    OldPid = os_pid(),
    Gen0 = maps:get(generation, pyport_ct_lib:stats(), undefined),
    T0 = now_ms(),
    {error, {pyport_exit, Status}} = py:exec(<<"import os; os.abort()">>),
    ct:log("os.abort() -> pyport_exit ~p", [Status]),
    true = now_ms() - T0 < 10000,
    _ = wait_recovered(T0),
    true = app_running(),
    NewPid = os_pid(),
    true = NewPid =/= OldPid,
    %% the old OS process is gone
    wait_until(fun() -> not os_process_alive(OldPid) end, 10000, old_port_process_gone),
    Gen1 = maps:get(generation, pyport_ct_lib:stats(), undefined),
    true = (Gen0 =:= undefined) orelse (Gen1 =/= Gen0),
    ok.

exit_status_reported(_Config) ->
    {error, {pyport_exit, 3}} = py:exec(<<"import os; os._exit(3)">>),
    _ = wait_recovered(now_ms()),
    ok.

segfault_then_recover(_Config) ->
    T0 = now_ms(),
    {error, {pyport_exit, Status}} = py:eval(<<"__import__('ctypes').string_at(0)">>),
    ct:log("segfault -> pyport_exit ~p", [Status]),
    _ = wait_recovered(T0),
    true = app_running(),
    ok.

%% SIGKILL from outside while 50 calls are in flight (running or queued):
%% every one of them is answered {error, {pyport_exit, _}} promptly.
sigkill_from_outside_with_pending_callers(_Config) ->
    OsPid = os_pid(),
    Self = self(),
    Callers = [spawn(fun() ->
                             R = py:eval(<<"__import__('time').sleep(60)">>, #{}, infinity),
                             Self ! {result, self(), R}
                     end) || _ <- lists:seq(1, 50)],
    wait_waiting(Callers),
    wait_until(fun() -> stat(busy_workers) >= 1 end, 10000, sleepers_running),
    T0 = now_ms(),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    Results = collect(result, Callers),
    AnsweredMs = now_ms() - T0,
    ct:log("50 pending callers answered ~b ms after SIGKILL: ~p", [AnsweredMs, hd(Results)]),
    [] = [R || R <- Results, not is_pyport_exit(R)],
    true = AnsweredMs < 10000,
    _ = wait_recovered(T0),
    true = os_pid() =/= OsPid,
    ok.

is_pyport_exit({error, {pyport_exit, _}}) -> true;
is_pyport_exit(_) -> false.

namespaces_start_empty(_Config) ->
    Self = self(),
    ok = py:exec(<<"x = 1">>),
    Holder = spawn_link(fun() ->
                                ok = py:exec(<<"y = 2">>),
                                Self ! {defined, self()},
                                receive check -> Self ! {checked, self(), py:eval(<<"y">>)} end
                        end),
    receive {defined, Holder} -> ok after 10000 -> ct:fail(holder_not_ready) end,
    true = stat(namespaces) >= 2,
    {error, {pyport_exit, _}} = py:exec(<<"import os; os.abort()">>),
    _ = wait_recovered(now_ms()),
    {error, {python, 'NameError', _, _}} = py:eval(<<"x">>),
    Holder ! check,
    [{error, {python, 'NameError', _, _}}] = collect(checked, [Holder]),
    %% only the namespaces created after the restart exist (this process's, the holder's)
    true = stat(namespaces) =< 2,
    ok.

%% SharedDicts live in the pool's shared memory: a crash of the port loses none of them,
%% nor any acknowledged write; the handle stays valid, from Erlang and from the new
%% port's Python, and what the VM cached before the crash is not served after a change.
dicts_survive_a_crash(_Config) ->
    {ok, SD} = py:shared_dict_new(),
    ok = py:shared_dict_set(SD, <<"k">>, <<"v">>),
    <<"v">> = py:shared_dict_get(SD, <<"k">>),
    Gen = stat(generation),
    {error, {pyport_exit, _}} = py:exec(<<"import os; os.abort()">>),
    _ = wait_recovered(now_ms()),
    ?assertNotEqual(Gen, stat(generation)),
    <<"v">> = py:shared_dict_get(SD, <<"k">>),
    {ok, <<"v">>} = py:eval(<<"__import__('erlang').SharedDict(sd)['k']">>, #{sd => SD}),
    ok = py:exec(<<"__import__('erlang').SharedDict(sd)['k'] = 'after'">>, #{sd => SD}),
    <<"after">> = py:shared_dict_get(SD, <<"k">>),
    ok = py:shared_dict_destroy(SD),
    ok = pyport_ct_lib:assert_destroyed(SD),
    {ok, <<"SharedDict has been destroyed">>} = python_destroyed_message(SD),
    ok.

python_destroyed_message(SD) ->
    ok = py:exec(<<"
from erlang import SharedDict
def _probe(h):
    try:
        SharedDict(h)['k']
        return 'no error'
    except RuntimeError as e:
        return str(e)
">>),
    py:call('__main__', '_probe', [SD]).

repeated_crashes_recover(_Config) ->
    lists:foreach(fun(I) ->
                          ok = py:exec(<<"n = i">>, #{i => I}),
                          T0 = now_ms(),
                          {error, {pyport_exit, _}} = py:exec(<<"import os; os.abort()">>),
                          _ = wait_recovered(T0),
                          {error, {python, 'NameError', _, _}} = py:eval(<<"n">>)
                  end, [1, 2, 3]),
    true = app_running(),
    ok.

%% sys_path and startup_code are applied after every (re)start.
startup_config_reapplied(Config) ->
    DataDir = ?config(data_dir, Config),
    ok = pyport_ct_lib:stop_app(),
    ok = application:set_env(pyport, sys_path, [DataDir]),
    ok = application:set_env(pyport, startup_code,
                             <<"import __main__, crash_cfg\n__main__.PYPORT_CT_MARK = crash_cfg.mark()\n">>),
    _ = pyport_ct_lib:start_app(),
    {ok, M1} = py:eval(<<"__import__('__main__').PYPORT_CT_MARK">>),
    {ok, <<"crash_cfg">>} = py:call(crash_cfg, name, []),
    {error, {pyport_exit, _}} = py:exec(<<"import os; os.abort()">>),
    _ = wait_recovered(now_ms()),
    {ok, M2} = py:eval(<<"__import__('__main__').PYPORT_CT_MARK">>),
    %% marks are the port's OS pid: the start-up code really ran again in the new port
    true = M1 =/= M2,
    {ok, M2} = py:eval(<<"__import__('os').getpid()">>),
    {ok, <<"crash_cfg">>} = py:call(crash_cfg, name, []),
    ok.

%%--------------------------------------------------------------------

os_process_alive(OsPid) ->
    %% `kill -0` fails for a process that no longer exists (zombies are reaped by erts)
    os:cmd("kill -0 " ++ integer_to_list(OsPid) ++ " 2>/dev/null && echo alive") =:= "alive\n".
